"""Reading a federation's stored records one by one, so that one bad record cannot brick it.

The records are written only by the registry, but what they hold came from outside (names, class
words, artifact metadata), an older version of the code may have accepted something the current
one refuses, and an operator may edit the state by hand. Each record is therefore parsed and checked
on its own at start-up; one that fails is *quarantined* — set aside with its reason (the record as
it was and its artifact file are moved under `state_dir/quarantine/`, see `StateStore.quarantine`),
logged, and reported by `Registry.info()` and `/v1/healthz` — and the federation starts with every
other record. Only problems with the federation as a whole (another base or adapter) still stop
the coordinator: those mean "wrong state folder".
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, TypeVar

from blocklora.config import AdapterConfig
from blocklora.files.schema import SchemaError, parse
from blocklora.method.artifact import ConceptArtifact, InvalidArtifact, check_class_word, check_name
from blocklora.method.slots import SlotSpace
from blocklora.method.tokens import trigger_names
from federation.auth import Client, Person, check_person_name, name_key
from federation.protocol import Quarantined
from federation.records import FORMAT, FORMAT_VERSION, Answered, ConceptRecord, Reservation
from federation.store import StateStore

T = TypeVar("T")
# what a bad record can raise while it is parsed and checked (a missing or corrupted artifact file
# is a RuntimeError of StateStore.read_concept, an unreadable one an OSError)
RECORD_ERRORS = (SchemaError, InvalidArtifact, ValueError, TypeError, KeyError, RuntimeError, OSError)


def refused(kind: str, key: Any, reason: str) -> Quarantined:
    return Quarantined(kind, ascii(key)[:80], reason[:500])


def sift(kind: str, section: dict[str, Any], build: Callable[[str, Any], T]
         ) -> tuple[dict[str, T], dict[str, Quarantined]]:
    """`build(key, raw)` for every record of one kind; the records it refuses are set aside with
    their reason (keyed like the section) instead of stopping the load."""
    kept: dict[str, T] = {}
    bad: dict[str, Quarantined] = {}
    for key, raw in section.items():
        try:
            kept[key] = build(key, raw)
        except RECORD_ERRORS as err:
            bad[key] = refused(kind, key, str(err))
    return kept, bad


class RecordChecks:
    """What a stored record must be to be loaded: exact types, a valid name keyed by its lower case,
    a known owner, a slot of this federation, an artifact file that is there and unchanged; and for
    the federation as a whole, the same base and adapter."""

    def __init__(self, space: SlotSpace, store: StateStore, base_spec: str, max_artifact_bytes: int) -> None:
        self.space, self.store, self.base_spec, self.max_artifact_bytes = space, store, base_spec, max_artifact_bytes
        self.adapter = space.adapter

    def triggers(self, slot: int) -> tuple[str, ...]:
        return tuple(trigger_names(slot, self.adapter.tokens_per_concept))

    def identity(self, ident: Any) -> str | None | bool:
        """Refuse a state folder of another base or adapter; the stored admin digest (False: not one)."""
        where = self.store.root
        if type(ident) is not dict or ident.get("format") != FORMAT or ident.get("format_version") != FORMAT_VERSION:
            raise RuntimeError(f"{where} does not hold a {FORMAT} v{FORMAT_VERSION} federation")
        if ident.get("base_fingerprint") != self.space.fingerprint:
            raise RuntimeError(f"{where} belongs to a federation on base {ascii(ident.get('base_fingerprint'))[:14]}… "
                               f"({ascii(ident.get('base_spec'))[:80]}), not {self.space.fingerprint[:12]}… "
                               f"({self.base_spec!r}); start with that base or use another state folder")
        try:
            stored = parse(AdapterConfig, ident.get("adapter"), "adapter")
        except SchemaError as err:
            raise RuntimeError(f"{where}: {err}") from None
        if stored != self.adapter:
            raise RuntimeError(f"{where} was created with {stored}, not {self.adapter}; start with the same "
                               "slots/rank/targets or use another state folder")
        admin = ident.get("admin_sha256")
        digest = admin is None or type(admin) is str and re.fullmatch(r"[0-9a-f]{64}", admin)
        return admin if digest else False

    def record(self, cls: type, kind: str, key: str, raw: Any, owners: set[str], field: str = "client") -> Any:
        """A record with exact types, keyed by its name's lower case, with a valid name and a known owner."""
        rec = parse(cls, raw, f"{kind} {key}")
        check_name(rec.name)
        if key != name_key(rec.name):
            raise ValueError(f"{kind} {rec.name!r} is stored under {key!a}; another {kind} has the same name in "
                             "another case (names are unique regardless of case)")
        if getattr(rec, field) not in owners:
            raise ValueError(f"{kind} {rec.name!r} belongs to {getattr(rec, field)[:40]!a}, who is not registered")
        return rec

    def _slotted(self, cls: type, kind: str, key: str, raw: Any, owners: set[str]) -> Any:
        rec = self.record(cls, kind, key, raw, owners)
        if not 0 <= rec.slot < self.adapter.num_slots:
            raise ValueError(f"{kind} {rec.name!r} holds slot {rec.slot}, outside 0..{self.adapter.num_slots - 1}")
        if check_class_word(rec.class_word) != rec.class_word:
            raise ValueError(f"{kind} {rec.name!r} has class word {rec.class_word!a} with surrounding whitespace")
        return rec

    def person(self, pid: str, raw: Any) -> Person:
        if not re.fullmatch(r"p[0-9a-f]{16}", pid):
            raise ValueError(f"person id {pid[:40]!a} is not p + 16 hex digits")
        rec = parse(Person, raw, f"person {pid}")
        check_person_name(rec.name)
        if not re.fullmatch(r"[0-9a-f]{64}", rec.invitation_sha256):
            raise ValueError(f"person {pid}: invitation_sha256 is not a sha256 hex digest")
        return rec

    def client(self, cid: str, raw: Any, people: Mapping[str, Person]) -> Client:
        if not re.fullmatch(r"c[0-9a-f]{16}", cid):
            raise ValueError(f"client id {cid[:40]!a} is not c + 16 hex digits")
        rec = parse(Client, raw, f"client {cid}")
        if rec.person not in people:
            raise ValueError(f"client {cid} belongs to person {rec.person[:40]!a}, who is not invited")
        if not re.fullmatch(r"[0-9a-f]{64}", rec.token_sha256):
            raise ValueError(f"client {cid}: token_sha256 is not a sha256 hex digest")
        return rec

    def reservation(self, key: str, raw: Any, owners: set[str], live: Mapping[str, Any]) -> Reservation:
        rec = self._slotted(Reservation, "reservation", key, raw, owners)
        if key in live:
            raise ValueError(f"reservation {rec.name!r}: a concept of that name is live")
        return rec

    def answered(self, key: str, raw: Any) -> Answered:
        if not (re.fullmatch(r"[A-Za-z0-9_-]{8,64}", key) and type(raw) is dict and type(raw.get("answer")) is dict):
            raise ValueError(f"request {key[:40]!a}: not an answered request")
        return dataclasses.replace(parse(Answered, {**raw, "answer": {}}, f"request {key}"), answer=raw["answer"])

    def concept(self, key: str, raw: Any, owners: set[str]) -> ConceptRecord:
        """A concept record whose artifact file is there and unchanged (its sha256)."""
        rec = self._slotted(ConceptRecord, "concept", key, raw, owners)
        if rec.triggers != self.triggers(rec.slot):
            raise ValueError(f"concept {rec.name!r}: triggers {rec.triggers} are not slot {rec.slot}'s")
        self.store.check_concept(rec.file, rec.sha256)
        return rec

    def member_artifact(self, rec: ConceptRecord) -> ConceptArtifact:
        """A collection member's artifact, which must still load, fit this federation and agree with its record."""
        data = self.store.read_concept(rec.file, rec.sha256)
        art = ConceptArtifact.from_bytes(data, max(self.max_artifact_bytes, len(data)))
        self.space.check(art)
        if (art.name, art.meta.slot, art.meta.triggers) != (rec.name, rec.slot, rec.triggers):
            raise ValueError(f"concept {rec.name!r}: its artifact is {art.name!r} in slot {art.meta.slot} "
                             f"{art.meta.triggers}, the record says slot {rec.slot} {rec.triggers}")
        return art
