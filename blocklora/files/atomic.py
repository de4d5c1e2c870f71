"""One way to replace a file on disk: a reader (or a crash) sees the old file or the whole new one.

The bytes go to a uniquely named tmp file beside the target, are fsynced, and the tmp file is
renamed over the target (rename is atomic within a folder); the folder is fsynced so the rename
itself survives a power cut. The tmp name is unique per call, so concurrent writers of the same
file never write into each other's tmp file; an interrupted write leaves only a `*.tmp` file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

TMP_SUFFIX = ".tmp"  # every in-flight write ends in this; cleaners may delete such files at start-up


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes, mode: int = 0o644) -> Path:
    """Write `data` to `path` (file mode `mode`) so that readers see the old file or the whole new one."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path
