"""The federation's whole state as one plain object: clients (whose tokens `federation.auth`
checks), slot reservations, live concepts and the merged residual. No Ray here, so every rule is
tested in-process; the coordinator actor only wraps it. Answers are `federation.protocol` types.

Every change is built as a new `_State`, persisted (artifact file first, manifest last) and only
then swapped in, so a refused or failed call leaves memory and disk exactly as they were. A lock
serialises calls, which keeps slot assignment collision-free even in a threaded or async actor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from blocklora.method.artifact import ConceptArtifact, InvalidArtifact, check_class_word, check_name
from blocklora.config import AdapterConfig, FederationConfig
from blocklora.method.export import MergedFactors
from blocklora.files.safefile import write_safetensors
from blocklora.files.schema import SchemaError, check_text, parse
from blocklora.method.slots import SlotSpace
from blocklora.method.tokens import trigger_names
from federation.auth import ADMIN, MAX_CLIENT_NAME, Accounts, Client
from federation.manifest import Quarantined, exclusive, sift
from federation.errors import (ArtifactRejected, FederationError, ReservationError, SlotUnavailable,  # noqa: F401
                               Unauthorized, UnknownConcept)
from federation.protocol import FederationInfo, Grant, HeldSlot, LiveConcept, Principal, Registration, Removed
from federation.store import StateStore

MANIFEST_FORMAT = "blocklora-federation"
MANIFEST_VERSION = 1
MERGE_RULES = ("sum", "mean")  # α = 1 each, or the paper's α = 1/|S|


@dataclass(frozen=True)
class _Reservation:
    client: str
    slot: int
    class_word: str
    expires_at: float  # wall-clock seconds, so expiry survives a coordinator restart
    id: str  # kept across renewals: names the client's training run, so only a retry of it resumes


@dataclass(frozen=True)
class _Concept:
    client: str
    slot: int
    class_word: str
    triggers: tuple[str, ...]
    file: str
    sha256: str
    version: int  # the federation version at which it went live


@dataclass(frozen=True)
class _State:
    """Everything the manifest holds; replaced whole on each change, never mutated."""

    version: int = 0
    accounts: Accounts = field(default_factory=Accounts)
    reservations: dict[str, _Reservation] = field(default_factory=dict)
    concepts: dict[str, _Concept] = field(default_factory=dict)


class Registry:
    """One federation: a base (fingerprint), an AdapterConfig (K slots, rank, targets), its concepts.

    It never sees the base itself, only what fits it (`space`: `SlotSpace.of(base, adapter)`, which
    carries the adapter and the base's native resolution) and the dtype of the merged LoRA it serves.
    The live set's merged residual is kept as `MergedFactors`: each live concept's A and owned B rows
    in that dtype, exact and block-sparse by construction; `merged_lora` serves it as one standard
    LoRA file, `merged_residual` forms the dense Σ dW for whoever asks.
    """

    def __init__(self, space: SlotSpace, config: FederationConfig = FederationConfig(),
                 store: StateStore | None = None, admin_token_sha256: str | None = None,
                 clock: Callable[[], float] = time.time, dtype: torch.dtype = torch.float32) -> None:
        """Loads the state in `store` if there is one (it must be for the same base and adapter)."""
        self.space, self.config, self.store, self.clock = space, config, store, clock
        self.adapter, self.resolution = space.adapter, space.resolution
        self._lock = threading.RLock()
        self._residual = MergedFactors(self.space.layout, dtype)
        self._bytes: dict[str, bytes] = {}  # live name -> its artifact as submitted (what replicas load)
        self.quarantined: list[Quarantined] = []  # records set aside when the state was loaded
        self._s = _State(accounts=Accounts(admin_token_sha256))
        manifest = store.read_manifest() if store else None
        if manifest is None:
            self._save(self._s)
        else:
            self._load(manifest, admin_token_sha256)

    # -- clients -------------------------------------------------------------------------------
    def register(self, client_name: str = "") -> Registration:
        """A new client; the token is returned once and only its sha256 is kept."""
        with self._lock:
            accounts, registration = self._s.accounts.register(client_name)
            self._commit(dataclasses.replace(self._s, accounts=accounts))
            return registration

    def whoami(self, token: str) -> Principal:
        """Who a token authenticates as (a client's saved token is checked with this before reuse)."""
        with self._lock:
            return self._s.accounts.whoami(token)

    # -- slots -----------------------------------------------------------------------------------
    def reserve(self, token: str, name: str, class_word: str) -> Grant:
        """Hold a free slot for concept `name` until the TTL; asking again renews the same slot."""
        with self._lock:
            client = self._s.accounts.client(token)
            try:
                check_name(name)
                class_word = check_class_word(class_word)  # the rule an uploaded artifact meets too
            except InvalidArtifact as err:
                raise ReservationError(str(err)) from None
            s = self._expired(self._s)
            if name in s.concepts:
                raise SlotUnavailable(f"concept {name!r} is already live in slot {s.concepts[name].slot}; "
                                      "pick another name, or remove it first")
            held = s.reservations.get(name)
            if held is not None and held.client != client:
                raise ReservationError(f"concept name {name!r} is reserved by another client until "
                                       f"{time.ctime(held.expires_at)}; pick another name")
            slot = held.slot if held else self._free_slot(s)
            if held is None:
                self._check_quota(s, client)
            res = _Reservation(client, slot, class_word, self.clock() + self.config.reservation_ttl_s,
                               held.id if held else secrets.token_hex(6))
            self._commit(dataclasses.replace(s, reservations={**s.reservations, name: res}))
            return Grant(name=name, slot=slot, class_word=res.class_word, triggers=self._triggers(slot),
                         adapter=self.adapter, base_spec=self.config.base, base_fingerprint=self.space.fingerprint,
                         resolution=self.resolution, expires_at=res.expires_at, reservation_id=res.id)

    def _triggers(self, slot: int) -> tuple[str, ...]:
        return tuple(trigger_names(slot, self.adapter.tokens_per_concept))

    def _admin_claim(self, s: _State, art: ConceptArtifact) -> _Reservation:
        """A reservation the admin takes on the spot for an upload: the artifact's own slot, if free."""
        if art.name in s.concepts:
            raise SlotUnavailable(f"concept {art.name!r} is already live; remove it first to replace it")
        taken = {r.slot: n for n, r in s.reservations.items()} | {c.slot: n for n, c in s.concepts.items()}
        if art.meta.slot in taken:
            raise SlotUnavailable(f"slot {art.meta.slot} of artifact {art.name!r} is held by {taken[art.meta.slot]!r}")
        return _Reservation(ADMIN, art.meta.slot, art.meta.class_word, self.clock() + self.config.reservation_ttl_s,
                            secrets.token_hex(6))

    def _check_quota(self, s: _State, client: str) -> None:
        """One client may not hold every slot: reservations and live concepts count alike."""
        quota = self.config.max_slots_per_client
        held = sum(e.client == client for e in (*s.reservations.values(), *s.concepts.values()))
        if held >= quota:
            raise SlotUnavailable(f"this client already holds {held} slot(s), the most one client may hold "
                                  f"(max_slots_per_client = {quota}); remove a concept or cancel a reservation")

    def _free_slot(self, s: _State) -> int:
        used = {r.slot for r in s.reservations.values()} | {c.slot for c in s.concepts.values()}
        for k in range(self.adapter.num_slots):
            if k not in used:
                return k
        raise SlotUnavailable(
            f"all {self.adapter.num_slots} slots are taken ({len(s.concepts)} live, {len(s.reservations)} "
            f"reserved); retry after a reservation expires (TTL {self.config.reservation_ttl_s:.0f} s) or ask "
            "the admin to remove a concept")

    # -- concepts ------------------------------------------------------------------------------
    def submit(self, token: str, data: bytes) -> LiveConcept:
        """Validate an artifact against the caller's reservation and the federation; make it live.

        The admin may also add an artifact without a reservation, into its own slot if that slot is
        free (runtime add of a concept trained elsewhere). Idempotent: the same bytes from the same
        owner, already live, return the live record."""
        with self._lock:
            client = self._s.accounts.authenticate(token)
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ArtifactRejected(f"an artifact is sent as bytes (ConceptArtifact.to_bytes()), got "
                                       f"{type(data).__name__}")
            data = bytes(data)
            limit = self.config.max_artifact_bytes
            if len(data) > limit:
                raise ArtifactRejected(f"artifact is {len(data):,} bytes; this federation accepts at most "
                                       f"{limit:,}. Lower the rank or the number of targets")
            try:
                art = ConceptArtifact.from_bytes(data, limit)
            except InvalidArtifact as err:
                raise ArtifactRejected(f"artifact refused: {err}") from None
            s = self._expired(self._s)
            live = s.concepts.get(art.name)
            if live is not None and live.client == client and live.sha256 == hashlib.sha256(data).hexdigest():
                # a retry of a submit that already went live (e.g. the reply was lost in a restart)
                return self._live_concept(s, art.name)
            held = s.reservations.get(art.name)
            if held is None and client == ADMIN:
                held = self._admin_claim(s, art)
            if held is None:
                raise ReservationError(f"no reservation for concept {art.name!r} (never made, or expired after "
                                       f"{self.config.reservation_ttl_s:.0f} s); reserve a slot and train for it")
            if held.client != client:
                raise ReservationError(f"concept {art.name!r} is reserved by another client; a client may only "
                                       "submit the concepts it reserved")
            if art.meta.slot != held.slot:
                raise ReservationError(f"artifact {art.name!r} was trained for slot {art.meta.slot}, but the "
                                       f"reservation is for slot {held.slot}; train again with the reserved slot")
            try:
                self.space.check(art)
            except InvalidArtifact as err:
                raise ArtifactRejected(f"artifact refused: {err}") from None
            file, digest = self.store.write_concept(art.name, data) if self.store else ("", hashlib.sha256(data).hexdigest())
            concept = _Concept(client, art.meta.slot, art.meta.class_word, art.meta.triggers, file, digest,
                               s.version + 1)
            new = dataclasses.replace(s, version=s.version + 1, concepts={**s.concepts, art.name: concept},
                                      reservations={n: r for n, r in s.reservations.items() if n != art.name})
            try:
                self._commit(new)
            except BaseException:
                if self.store:
                    self.store.delete_concept(file)
                raise
            self._residual.add(art)  # its own factors: the other live concepts' are untouched
            self._bytes[art.name] = data
            return self._live_concept(new, art.name)

    def remove(self, token: str, name: str) -> Removed:
        """Take a live concept out (its factors leave the residual) or cancel a reservation;
        allowed to the owner and to the admin."""
        with self._lock:
            who = self._s.accounts.authenticate(token)
            s = self._expired(self._s)
            entry = s.concepts.get(name) or s.reservations.get(name)
            if entry is None:
                raise UnknownConcept(f"no live concept or reservation named {name!r}; live: {sorted(s.concepts)}")
            if who != ADMIN and entry.client != who:
                raise Unauthorized(f"concept {name!r} belongs to another client; only its owner or the admin "
                                   "may remove it")
            if name not in s.concepts:
                self._commit(dataclasses.replace(
                    s, reservations={n: r for n, r in s.reservations.items() if n != name}))
                return Removed(name, entry.slot, s.version, "reservation")
            new = dataclasses.replace(s, version=s.version + 1,
                                      concepts={n: c for n, c in s.concepts.items() if n != name})
            self._commit(new)
            self._residual.remove(name)
            del self._bytes[name]
            if self.store:
                self.store.delete_concept(entry.file)  # after the manifest: a crash leaves an orphan only
            return Removed(name, entry.slot, new.version, "concept")

    # -- reads -----------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """Counts changes of the live set (submit, remove): what a serving replica must follow."""
        return self._s.version

    def list_concepts(self) -> list[LiveConcept | HeldSlot]:
        """Live concepts and current reservations, in slot order (no tokens, no tensors)."""
        with self._lock:
            s = self._expired(self._s)
            rows: list[LiveConcept | HeldSlot] = [self._live_concept(s, n) for n in s.concepts]
            rows += [HeldSlot(name=n, slot=r.slot, triggers=self._triggers(r.slot), class_word=r.class_word,
                              owner=s.accounts.name(r.client), expires_at=r.expires_at)
                     for n, r in s.reservations.items()]
            return sorted(rows, key=lambda r: r.slot)

    def live(self) -> tuple[int, dict[str, tuple[LiveConcept, bytes]]]:
        """(version, name -> (the live record, the artifact's bytes))."""
        with self._lock:
            return self._s.version, {n: (self._live_concept(self._s, n), self._bytes[n]) for n in self._s.concepts}

    def merged_residual(self) -> dict[str, torch.Tensor]:
        """Target key -> Σ over live concepts of dW (m x n, the base's dtype), formed on this call."""
        with self._lock:
            return self._residual.dense()

    def merged_lora(self, rule: str = "sum") -> tuple[int, bytes]:
        """(version, the live set as one standard LoRA safetensors file): diffusers'
        `pipe.load_lora_weights` applies W0 + Σ α dW with α = 1 ("sum") or 1/|S| ("mean")."""
        if rule not in MERGE_RULES:
            raise FederationError(f"merge rule {rule!r} is not offered; use one of {list(MERGE_RULES)}")
        with self._lock:
            s = self._s
            if not s.concepts:
                raise UnknownConcept("no concept is live: there is nothing to download yet")
            alpha = 1.0 / len(s.concepts) if rule == "mean" else 1.0
            live = {n: {"slot": c.slot, "triggers": list(c.triggers), "class_word": c.class_word}
                    for n, c in s.concepts.items()}
            data = write_safetensors(self._residual.lora_state_dict(dict.fromkeys(s.concepts, alpha)), {
                "format": "blocklora-merged-lora", "version": str(s.version), "rule": rule,
                "base_fingerprint": self.space.fingerprint, "concepts": json.dumps(live, sort_keys=True)})
            return s.version, data

    def info(self) -> FederationInfo:
        with self._lock:
            s = self._expired(self._s)
            taken = len(s.concepts) + len(s.reservations)
            return FederationInfo(
                base_spec=self.config.base, base_fingerprint=self.space.fingerprint, resolution=self.resolution,
                adapter=self.adapter, free_slots=self.adapter.num_slots - taken, live=len(s.concepts),
                reserved=len(s.reservations), version=s.version, max_artifact_bytes=self.config.max_artifact_bytes,
                reservation_ttl_s=self.config.reservation_ttl_s, max_slots_per_client=self.config.max_slots_per_client,
                quarantined=tuple(self.quarantined), state_dir=str(self.store.root) if self.store else None)

    # -- internals -----------------------------------------------------------------------------
    def _live_concept(self, s: _State, name: str) -> LiveConcept:
        c = s.concepts[name]
        return LiveConcept(name=name, slot=c.slot, triggers=c.triggers, class_word=c.class_word,
                           owner=s.accounts.name(c.client), version=c.version, sha256=c.sha256)

    def _expired(self, s: _State) -> _State:
        """`s` without the reservations whose TTL has passed (persisted by the caller's commit)."""
        now = self.clock()
        keep = {n: r for n, r in s.reservations.items() if r.expires_at > now}
        if len(keep) == len(s.reservations):
            return s
        new = dataclasses.replace(s, reservations=keep)
        self._commit(new)
        return new

    def _commit(self, new: _State) -> None:
        self._save(new)
        self._s = new

    def _save(self, s: _State) -> None:
        if self.store is None:
            return
        self.store.write_manifest({
            "format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "base_spec": self.config.base,
            "base_fingerprint": self.space.fingerprint, "adapter": dataclasses.asdict(self.adapter),
            "version": s.version, "admin_sha256": s.accounts.admin_sha256,
            "clients": {k: dataclasses.asdict(v) for k, v in s.accounts.clients.items()},
            "reservations": {k: dataclasses.asdict(v) for k, v in s.reservations.items()},
            "concepts": {k: dataclasses.asdict(v) for k, v in s.concepts.items()},
        })

    def _load(self, m: Any, admin_token_sha256: str | None) -> None:
        """Rebuild from a manifest: every record checked on its own (a bad one is quarantined, see
        federation/manifest.py), every artifact re-read, re-validated and re-applied."""
        where = self.store.manifest_path
        if type(m) is not dict or m.get("format") != MANIFEST_FORMAT or m.get("format_version") != MANIFEST_VERSION:
            raise RuntimeError(f"{where} is not a {MANIFEST_FORMAT} v{MANIFEST_VERSION} manifest")
        if m.get("base_fingerprint") != self.space.fingerprint:
            raise RuntimeError(f"{where} belongs to a federation on base {ascii(m.get('base_fingerprint'))[:14]}… "
                               f"({ascii(m.get('base_spec'))[:80]}), not {self.space.fingerprint[:12]}… "
                               f"({self.config.base!r}); start with that base or use another state folder")
        try:
            stored = parse(AdapterConfig, m.get("adapter"), "adapter")
        except SchemaError as err:
            raise RuntimeError(f"{where}: {err}") from None
        if stored != self.adapter:
            raise RuntimeError(f"{where} was created with {stored}, not {self.adapter}; start with the same "
                               "slots/rank/targets or use another state folder")
        clients, bad = sift("client", m.get("clients"), self._client_record)
        owners = {*clients, ADMIN}
        loaded, q = sift("concept", m.get("concepts"), lambda n, v: self._concept_record(n, v, owners))
        taken: dict[int, str] = {}
        loaded, q2 = exclusive("concept", dict(sorted(loaded.items(), key=lambda kv: kv[1][0].version)),
                               lambda c: c[0].slot, taken)
        reservations, q3 = sift("reservation", m.get("reservations"),
                                lambda n, v: self._record(_Reservation, "reservation", n, v, owners))
        reservations, q4 = exclusive("reservation", reservations, lambda r: r.slot, taken)
        bad += q + q2 + q3 + q4
        admin = m.get("admin_sha256")
        if admin is not None and not (type(admin) is str and re.fullmatch(r"[0-9a-f]{64}", admin)):
            bad.append(Quarantined("admin", "admin_sha256", "not a sha256 hex digest; the admin token given at "
                                                            "start-up (if any) is used instead"))
            admin = None
        version = m.get("version") if type(m.get("version")) is int else 0
        s = _State(version=max([version, *(c.version for c, _, _ in loaded.values())]),
                   accounts=Accounts(admin or admin_token_sha256, clients), reservations=reservations,
                   concepts={n: c for n, (c, _, _) in loaded.items()})
        for name, (_, art, data) in loaded.items():
            self._residual.add(art)
            self._bytes[name] = data
        if bad:
            self.quarantined = bad
            self.store.quarantine([dataclasses.asdict(b) for b in bad], {c.file for c in s.concepts.values()})
        self.store.clean({c.file for c in s.concepts.values()})
        self._commit(s)

    def _record(self, cls: type, kind: str, name: str, raw: Any, owners: set[str]) -> Any:
        """A reservation or concept record with exact types, a valid name and class word, a known
        owner and a slot of this federation."""
        check_name(name)
        rec = parse(cls, raw, f"{kind} {name}")
        if rec.client not in owners:
            raise ValueError(f"{kind} {name!r} belongs to client {rec.client[:40]!a}, which is not registered")
        if not 0 <= rec.slot < self.adapter.num_slots:
            raise ValueError(f"{kind} {name!r} holds slot {rec.slot}, outside 0..{self.adapter.num_slots - 1}")
        if check_class_word(rec.class_word) != rec.class_word:
            raise ValueError(f"{kind} {name!r} has class word {rec.class_word!a} with surrounding whitespace")
        return rec

    def _client_record(self, client_id: str, raw: Any) -> Client:
        if not re.fullmatch(r"c[0-9a-f]{16}", client_id):
            raise ValueError(f"client id {client_id[:40]!a} is not c + 16 hex digits")
        rec = parse(Client, raw, f"client {client_id}")
        check_text(rec.name, "client name", MAX_CLIENT_NAME)
        if not re.fullmatch(r"[0-9a-f]{64}", rec.token_sha256):
            raise ValueError(f"client {client_id}: token_sha256 is not a sha256 hex digest")
        return rec

    def _concept_record(self, name: str, raw: Any, owners: set[str]) -> tuple[_Concept, ConceptArtifact, bytes]:
        """A concept record and its artifact, which must still load, fit this federation and agree
        with the record."""
        rec = self._record(_Concept, "concept", name, raw, owners)
        data = self.store.read_concept(rec.file, rec.sha256)
        art = ConceptArtifact.from_bytes(data, max(self.config.max_artifact_bytes, len(data)))
        self.space.check(art)
        if (art.name, art.meta.slot, art.meta.triggers) != (name, rec.slot, rec.triggers):
            raise ValueError(f"concept {name!r}: its artifact is {art.name!r} in slot {art.meta.slot} "
                             f"{art.meta.triggers}, the record says slot {rec.slot} {rec.triggers}")
        return rec, art, data
