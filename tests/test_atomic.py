"""atomic_write: a reader sees the old file or the whole new one, whatever the writers do."""

import os
import threading
from pathlib import Path

import pytest

from blocklora.files.atomic import TMP_SUFFIX, atomic_write


def test_writes_bytes_with_the_mode_and_leaves_no_tmp(tmp_path: Path) -> None:
    path = atomic_write(tmp_path / "token", b"secret", 0o600)
    assert path.read_bytes() == b"secret" and (path.stat().st_mode & 0o777) == 0o600
    assert os.listdir(tmp_path) == ["token"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = atomic_write(tmp_path / "state.json", b"old")
    with pytest.raises(TypeError):
        atomic_write(path, "not bytes")  # type: ignore[arg-type]  # fails after the tmp file exists
    assert path.read_bytes() == b"old" and not list(tmp_path.glob(f"*{TMP_SUFFIX}"))


def test_concurrent_writers_never_show_a_reader_half_a_file(tmp_path: Path) -> None:
    """Two writers replace one file 30 times each while a reader reads it: every read is one whole payload."""
    path = tmp_path / "shared.bin"
    payloads = [bytes([i]) * 300_000 for i in (1, 2)]
    atomic_write(path, payloads[0])
    seen: set[bytes] = set()
    done = threading.Event()

    def write(data: bytes) -> None:
        for _ in range(30):
            atomic_write(path, data)

    def read() -> None:
        while not done.is_set():
            seen.add(path.read_bytes())

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    done.set()
    reader.join()
    assert seen <= set(payloads) and len(seen) >= 1
    assert not list(tmp_path.glob(f"*{TMP_SUFFIX}"))
