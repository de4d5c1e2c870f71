"""A federation's state on disk: one safetensors file per live concept plus one JSON manifest.

Every write goes to a tmp file that is fsynced and then renamed over its target (and the folder
fsynced), and the manifest is always written last: a crash at any point leaves the previous
manifest or the new one, never half of either, and at worst an artifact file no manifest names,
which `clean` removes at the next start.

    state_dir/
      manifest.json                      the registry's whole state except tensors
      concepts/<name>-<sha256[:16]>.safetensors
      admin_token                        written once by jobs/start_coordinator.py (mode 0600)
      quarantine/<UTC time>/             records refused at start-up: the manifest as it was, their
                                         artifact files, reasons.json (see federation/manifest.py)
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from blocklora.files.atomic import TMP_SUFFIX, atomic_write

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


class StateStore:
    """Reads and atomically writes one federation's state folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.concepts = self.root / "concepts"
        self.concepts.mkdir(parents=True, exist_ok=True)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def read_manifest(self) -> dict[str, Any] | None:
        """The last committed manifest, or None for a new state folder."""
        if not self.manifest_path.exists():
            return None
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise RuntimeError(f"{self.manifest_path} is not valid JSON ({err}); it was not written by "
                               "this store (writes are atomic). Restore it from a backup or start a new "
                               "state folder") from None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write(self.manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode(), 0o600)

    def write_concept(self, name: str, data: bytes) -> tuple[str, str]:
        """Store an artifact's bytes; returns (file name, sha256) for the manifest to reference."""
        digest = hashlib.sha256(data).hexdigest()
        file = f"{name}-{digest[:16]}.safetensors"
        atomic_write(self.concepts / file, data)
        return file, digest

    def read_concept(self, file: str, sha256: str) -> bytes:
        """An artifact the manifest references, checked against the digest recorded for it."""
        path = self.concepts / Path(file).name
        if not path.is_file():
            raise RuntimeError(f"the manifest references {path}, which is missing; the state folder was "
                               "modified by hand. Restore the file or remove the concept from the manifest")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise RuntimeError(f"{path} does not match the sha256 recorded in the manifest; it is corrupted")
        return data

    def delete_concept(self, file: str) -> None:
        (self.concepts / Path(file).name).unlink(missing_ok=True)

    def quarantine(self, reasons: list[dict[str, str]], referenced: set[str]) -> Path:
        """Set aside what a load refused: a copy of the manifest as it was, every artifact file
        the kept records do not reference (moved, so `clean` does not delete it) and the reasons.
        Nothing is lost: an operator can inspect and restore by hand."""
        folder = self.root / "quarantine" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.manifest_path, folder / MANIFEST)
        for path in self.concepts.iterdir():
            if path.is_file() and path.name not in referenced and not path.name.endswith(TMP_SUFFIX):
                path.replace(folder / path.name)
        atomic_write(folder / "reasons.json", json.dumps(reasons, indent=1).encode())
        for r in reasons:
            log.warning("quarantined %s %s: %s (moved to %s)", r["kind"], r["name"], r["reason"], folder)
        return folder

    def clean(self, referenced: set[str]) -> list[str]:
        """Remove tmp files of interrupted writes and artifact files no manifest names."""
        removed = []
        for folder in (self.root, self.concepts):
            for path in folder.iterdir():
                stray_tmp = path.name.endswith(TMP_SUFFIX)
                orphan = folder == self.concepts and path.name not in referenced
                if path.is_file() and (stray_tmp or orphan):
                    path.unlink()
                    removed.append(path.name)
        return removed
