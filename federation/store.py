"""A federation's state folder: its records in one SQLite database (WAL mode), artifacts as files,
and a lock that keeps a second coordinator out.

    state_dir/
      federation.db (-wal, -shm)        every record but tensors, one row each (kind, key, JSON value)
      concepts/<name>-<sha256[:16]>.safetensors
      coordinator.lock                  flock held for the coordinator's life; says who holds it
      admin_token                       written once by jobs/start_coordinator.py (mode 0600)
      quarantine/<UTC time>/            records refused at start-up: records.json, their artifact
                                        files, reasons.json (see federation/manifest.py)
      manifest.json.migrated            a pre-SQLite manifest, kept after its records moved in

Why SQLite: a change writes the rows it changes in one transaction (one fsync), never the whole
state, so registering the 5,000th client costs what the first did; a transaction is all or
nothing, so a crash at any point leaves the last committed state. Artifacts stay files (safetensors,
written atomically and fsynced before the record that names them commits). The store writes an
intent record ("file") before it writes or deletes an artifact file, so start-up clean-up removes
only the files this store meant to write or delete (`clean`); anything else in the folder is an
operator's, and is left alone and logged.

Every write error (a read-only or full disk) is raised as `StateUnavailable` naming the folder
and the reason; reads (`load`, `read_concept`) never write.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from blocklora.files.atomic import TMP_SUFFIX, atomic_write
from federation.errors import StateUnavailable

DATABASE = "federation.db"
LOCK = "coordinator.lock"
MANIFEST = "manifest.json"  # the state of a federation before this store: migrated on first start
LOCK_WAIT_S = 15.0  # how long a coordinator waits for its own previous incarnation to let go
log = logging.getLogger(__name__)

Key = tuple[str, str]  # (kind, key) of one record


def _reason(err: BaseException) -> str:
    """What an operator should read about a failed write: the OS's words for the common cases."""
    code = getattr(err, "errno", None) or getattr(getattr(err, "__cause__", None), "errno", None)
    if code == errno.ENOSPC or "full" in str(err).lower():
        return "the disk is full"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or "readonly" in str(err).lower():
        return "it is read-only"
    if code == errno.EFBIG:
        return "a file there may not grow (file size limit)"
    if "database is locked" in str(err):  # past the connection's wait: e.g. an operator's sqlite3 shell mid-change
        return f"another process holds a write lock on {DATABASE}"
    return f"{type(err).__name__}: {err}"


class FolderLock:
    """An exclusive flock on `root/coordinator.lock`, held until `release` or the process ends.

    The kernel drops a flock when its process dies, however it dies, so a lock file whose flock
    nobody holds is stale by definition: it is taken over and the previous holder is logged. A
    live holder other than `holder` is refused at once, naming it; the same `holder` (a
    coordinator restarted by Ray while its previous process is still being reaped) is waited for
    up to `wait_s`."""

    def __init__(self, root: Path, holder: str, wait_s: float = LOCK_WAIT_S) -> None:
        self.path = root / LOCK
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                other = self._read()
                if other.get("holder") != holder or time.monotonic() > deadline:
                    os.close(self.fd)
                    raise RuntimeError(
                        f"state folder {root} is in use by {other.get('holder', 'another process')} (pid "
                        f"{other.get('pid', '?')} on {other.get('host', '?')}, since {other.get('since', '?')}); "
                        "two coordinators on one folder would overwrite each other's records. Stop that one "
                        "first (python jobs/stop_coordinator.py --name ...) or use another --state-dir") from None
                time.sleep(0.2)
        previous = self._read()
        if previous:
            log.warning("state folder %s: took over the lock of %s (pid %s on %s), which no longer holds it",
                        root, previous.get("holder"), previous.get("pid"), previous.get("host"))
        info = {"holder": holder, "pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(info).encode(), 0)
        os.fsync(self.fd)

    def _read(self) -> dict[str, Any]:
        try:
            info = json.loads(os.pread(self.fd, 4096, 0) or b"{}")
            return info if type(info) is dict else {}
        except ValueError:
            return {}

    def release(self) -> None:
        if self.fd >= 0:
            os.ftruncate(self.fd, 0)  # a clean exit leaves no holder to report as stale
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


class StateStore:
    """Reads and transactionally writes one federation's state folder, which it holds locked
    (`holder` names this process in a refusal another coordinator gets) until `close`."""

    def __init__(self, root: str | Path, holder: str = "a federation registry") -> None:
        self.root = Path(root).expanduser().resolve()
        self.concepts = self.root / "concepts"
        try:
            self.concepts.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RuntimeError(f"cannot create the state folder {self.concepts}: {_reason(err)}") from None
        self.lock = FolderLock(self.root, holder)
        try:
            self.db = sqlite3.connect(self.root / DATABASE, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a commit acknowledged to a client survives a power cut
            self.db.execute("CREATE TABLE IF NOT EXISTS records (kind TEXT NOT NULL, key TEXT NOT NULL, "
                            "value TEXT NOT NULL, PRIMARY KEY (kind, key)) WITHOUT ROWID")
        except sqlite3.Error as err:
            self.lock.release()
            raise RuntimeError(f"cannot open {self.root / DATABASE}: {err}; restore it from a backup or "
                               "start a new state folder") from None
        os.chmod(self.root / DATABASE, 0o600)  # client token digests: for the coordinator's eyes only

    def close(self) -> None:
        """Let go of the folder (the next coordinator may open it); closing twice is harmless."""
        self.db.close()
        self.lock.release()

    # -- records ----------------------------------------------------------------------------------
    def load(self) -> dict[str, dict[str, Any]]:
        """Every record: kind -> key -> its JSON value (the raw text where it is not JSON, for the
        loader to refuse with the rest of the record's checks)."""
        out: dict[str, dict[str, Any]] = {}
        for kind, key, text in self.db.execute("SELECT kind, key, value FROM records"):
            try:
                value = json.loads(text)
            except ValueError:
                value = text
            out.setdefault(kind, {})[key] = value
        return out

    def commit(self, put: Mapping[Key, Any] | None = None, delete: Iterable[Key] = ()) -> None:
        """Write `put` and delete `delete` in one transaction: all of it is committed, or none."""
        rows = [(kind, key, json.dumps(value, sort_keys=True)) for (kind, key), value in (put or {}).items()]
        with self._writing("commit a change"):
            try:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.executemany("DELETE FROM records WHERE kind = ? AND key = ?", list(delete))
                self.db.executemany("INSERT OR REPLACE INTO records VALUES (?, ?, ?)", rows)
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        try:
            yield
        except (OSError, sqlite3.Error) as err:
            raise StateUnavailable(f"the state folder {self.root} cannot be written ({_reason(err)}); could not "
                                   f"{what}. Nothing changed: free space or make it writable, then retry") from None

    # -- artifacts ---------------------------------------------------------------------------------
    def write_concept(self, name: str, data: bytes) -> tuple[str, str]:
        """Store an artifact's bytes; returns (file name, sha256) for its record to reference. The
        intent record goes first: a crash before the concept's record commits leaves a file that
        start-up clean-up knows to be this store's."""
        digest = hashlib.sha256(data).hexdigest()
        file = f"{name}-{digest[:16]}.safetensors"
        self.commit({("file", file): "writing"})
        with self._writing(f"write {file}"):
            atomic_write(self.concepts / file, data, 0o600)
        return file, digest

    def read_concept(self, file: str, sha256: str) -> bytes:
        """An artifact a record references, checked against the digest recorded for it."""
        path = self.concepts / Path(file).name
        if not path.is_file():
            raise RuntimeError(f"concept record references {path}, which is missing; the state folder was "
                               "modified by hand. Restore the file, or let the coordinator quarantine the record")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise RuntimeError(f"{path} does not match the sha256 recorded for it; it is corrupted")
        return data

    def check_concept(self, file: str, sha256: str) -> None:
        """`read_concept` without keeping the bytes (start-up checks every file this way)."""
        path = self.concepts / Path(file).name
        if not path.is_file():
            self.read_concept(file, sha256)  # raises, naming the missing file
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            raise RuntimeError(f"{path} does not match the sha256 recorded for it; it is corrupted")

    def delete_concept(self, file: str) -> None:
        """Remove a file whose record is gone (the caller committed a "deleting" intent for it with
        that removal); a crash before the intent is cleared is finished at the next start."""
        with self._writing(f"delete {file}"):
            (self.concepts / Path(file).name).unlink(missing_ok=True)
        self.commit(delete=[("file", file)])

    # -- start-up -----------------------------------------------------------------------------------
    def legacy_manifest(self) -> dict[str, Any] | None:
        """The manifest.json of a federation from before this store, if the database is still empty."""
        path = self.root / MANIFEST
        if not path.exists() or self.db.execute("SELECT 1 FROM records LIMIT 1").fetchone():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as err:
            raise RuntimeError(f"{path} is not valid JSON ({err}); restore it from a backup or start a new "
                               "state folder") from None

    def retire_manifest(self) -> None:
        """Once its records are committed here: the old manifest is kept, renamed, never read again."""
        (self.root / MANIFEST).replace(self.root / f"{MANIFEST}.migrated")

    def quarantine(self, reasons: list[dict[str, str]], records: Mapping[Key, Any], files: Iterable[str]) -> Path:
        """Set aside what a load refused: the refused records as they were (records.json), their
        artifact files (moved) and the reasons; then the records leave the database. Nothing is
        lost: an operator can inspect and restore by hand."""
        folder = self.root / "quarantine" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "records.json", json.dumps(
            [{"kind": k, "key": key, "value": v} for (k, key), v in records.items()], indent=1).encode(), 0o600)
        for file in files:
            path = self.concepts / Path(file).name
            if path.is_file():
                path.replace(folder / path.name)
        atomic_write(folder / "reasons.json", json.dumps(reasons, indent=1).encode())
        self.commit(delete=list(records))
        for r in reasons:
            log.warning("quarantined %s %s: %s (moved to %s)", r["kind"], r["name"], r["reason"], folder)
        return folder

    def clean(self, referenced: set[str], intents: Iterable[str]) -> list[str]:
        """Finish interrupted writes and deletes: each file with an intent record (`intents`) that no
        record references is removed, with its tmp files. Every other file is left alone, and what
        no record references is logged: the coordinator did not write it."""
        removed, intents = [], set(intents)
        for path in sorted(self.concepts.iterdir()):
            ours = path.name in intents or (path.name.endswith(TMP_SUFFIX) and
                                            path.name.removeprefix(".").rsplit(".", 2)[0] in intents)
            if path.is_file() and ours and path.name not in referenced:
                path.unlink()
                removed.append(path.name)
            elif path.name not in referenced:
                log.warning("state folder %s: %s was not written by this coordinator; left alone",
                            self.concepts, path.name)
        self.commit(delete=[("file", f) for f in intents])
        return removed
