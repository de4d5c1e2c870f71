"""Reading a federation's manifest record by record, so that one bad record cannot brick it.

The manifest is written only by the registry, but what it holds came from outside (names, class
words, artifact metadata), an older version of the code may have accepted something the current
one refuses, and an operator may edit the file by hand. Each record is therefore parsed and checked
on its own at start-up; one that fails is *quarantined* — set aside with its reason (the manifest as
it was and the record's artifact file are moved under `state_dir/quarantine/`, see
`StateStore.quarantine`), logged, and reported by `Registry.info()` and `/v1/healthz` — and the
federation starts with every other record. Only problems with the manifest as a whole (not JSON,
another base or adapter) still stop the coordinator: those mean "wrong state folder".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from blocklora.files.schema import SchemaError
from blocklora.method.artifact import InvalidArtifact

T = TypeVar("T")
# what a bad record can raise while it is parsed and checked (a missing or corrupted artifact file
# is a RuntimeError of StateStore.read_concept, an unreadable one an OSError)
RECORD_ERRORS = (SchemaError, InvalidArtifact, ValueError, TypeError, KeyError, RuntimeError, OSError)


@dataclass(frozen=True)
class Quarantined:
    """A record left out at start-up, and why."""

    kind: str  # "client" | "reservation" | "concept"
    name: str  # the record's key, ascii-escaped and bounded (it may be the malformed part)
    reason: str


def sift(kind: str, section: Any, build: Callable[[str, Any], T]) -> tuple[dict[str, T], list[Quarantined]]:
    """`build(name, raw)` for every record of a manifest section; the records it refuses are set
    aside with their reason instead of stopping the load."""
    if type(section) is not dict:
        return {}, [Quarantined(kind, "*", f"the {kind} section is not a JSON object")]
    kept: dict[str, T] = {}
    bad: list[Quarantined] = []
    for name, raw in section.items():
        try:
            kept[name] = build(name, raw)
        except RECORD_ERRORS as err:
            bad.append(Quarantined(kind, ascii(name)[:80], str(err)[:500]))
    return kept, bad


def exclusive(kind: str, records: dict[str, T], slot_of: Callable[[T], int], taken: dict[int, str]
              ) -> tuple[dict[str, T], list[Quarantined]]:
    """Records in iteration order, each claiming its slot in `taken` (updated); a record whose slot
    is already claimed is quarantined: two concepts must never share rows."""
    kept: dict[str, T] = {}
    bad: list[Quarantined] = []
    for name, record in records.items():
        slot = slot_of(record)
        if slot in taken:
            bad.append(Quarantined(kind, name, f"slot {slot} is already held by {taken[slot]!r}"))
        else:
            taken[slot] = name
            kept[name] = record
    return kept, bad
