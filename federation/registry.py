"""The federation's whole state as one plain object: clients, slot reservations, live concepts and
the merged residual. No Ray here, so every rule is tested in-process; the coordinator actor only
wraps it.

Every change is built as a new `_State`, persisted (artifact file first, manifest last) and only
then swapped in, so a refused or failed call leaves memory and disk exactly as they were. A lock
serialises calls, which keeps slot assignment collision-free even in a threaded or async actor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from blocklora.artifact import ConceptArtifact, InvalidArtifact, check_class_word, check_name
from blocklora.base import Base
from blocklora.config import AdapterConfig, FederationConfig
from blocklora.schema import SchemaError, check_text, parse
from blocklora.slots import SlotSpace
from blocklora.tokens import trigger_names
from federation.manifest import Quarantined, exclusive, sift
from federation.errors import (ArtifactRejected, FederationError, ReservationError, SlotUnavailable,  # noqa: F401
                               Unauthorized, UnknownConcept)
from federation.store import StateStore

MANIFEST_FORMAT = "blocklora-federation"
MANIFEST_VERSION = 1
ADMIN = "admin"  # the principal of the admin token; client ids start with "c", so never collide
MAX_CLIENT_NAME = 64


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class _Client:
    name: str
    token_sha256: str


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
    admin_sha256: str | None = None
    clients: dict[str, _Client] = field(default_factory=dict)
    reservations: dict[str, _Reservation] = field(default_factory=dict)
    concepts: dict[str, _Concept] = field(default_factory=dict)


class Registry:
    """One federation: a base (fingerprint), an AdapterConfig (K slots, rank, targets), its concepts."""

    def __init__(self, base: Base, adapter: AdapterConfig, config: FederationConfig = FederationConfig(),
                 store: StateStore | None = None, admin_token_sha256: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """Loads the state in `store` if there is one (it must be for the same base and adapter)."""
        self.base, self.adapter, self.config, self.store, self.clock = base, adapter, config, store, clock
        self._lock = threading.RLock()
        self.space = SlotSpace.of(base, adapter)  # what fits, read once; the base is never changed
        self._residual = {k: torch.zeros(m, n) for k, (m, n) in self.space.layout.items()}  # (m, n) f32
        self._artifacts: dict[str, tuple[ConceptArtifact, bytes]] = {}
        self.quarantined: list[Quarantined] = []  # records set aside when the state was loaded
        self._s = _State(admin_sha256=admin_token_sha256)
        manifest = store.read_manifest() if store else None
        if manifest is None:
            self._save(self._s)
        else:
            self._load(manifest, admin_token_sha256)

    # -- clients -------------------------------------------------------------------------------
    def register(self, client_name: str = "") -> dict[str, str]:
        """A new client; the token is returned once and only its sha256 is kept."""
        if type(client_name) is not str:
            raise FederationError(f"client name must be a string, got {type(client_name).__name__}")
        try:
            if client_name:  # empty: the client id is its name
                check_text(client_name, "client name", MAX_CLIENT_NAME)
        except SchemaError as err:
            raise FederationError(str(err)) from None
        with self._lock:
            client_id = "c" + secrets.token_hex(8)
            token = f"{client_id}.{new_token()}"
            clients = {**self._s.clients, client_id: _Client(client_name or client_id, token_hash(token))}
            self._commit(dataclasses.replace(self._s, clients=clients))
            return {"client_id": client_id, "token": token}

    def whoami(self, token: str) -> dict[str, Any]:
        """Who a token authenticates as (a client's saved token is checked with this before reuse)."""
        with self._lock:
            who = self._authenticate(token)
            name = self._owner_name(self._s, who)
            return {"client_id": who, "name": name, "admin": who == ADMIN}

    # -- slots -----------------------------------------------------------------------------------
    def reserve(self, token: str, name: str, class_word: str) -> dict[str, Any]:
        """Hold a free slot for concept `name` until the TTL; asking again renews the same slot."""
        with self._lock:
            client = self._client(token)
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
            return {"name": name, "slot": slot, "class_word": res.class_word,
                    "triggers": trigger_names(slot, self.adapter.tokens_per_concept),
                    "adapter": dataclasses.asdict(self.adapter), "base_spec": self.config.base,
                    "base_fingerprint": self.base.fingerprint, "resolution": self.base.resolution,
                    "expires_at": res.expires_at, "reservation_id": res.id}

    def _admin_claim(self, s: _State, art: ConceptArtifact) -> _Reservation:
        """A reservation the admin takes on the spot for an upload: the artifact's own slot, if free."""
        if art.name in s.concepts:
            raise SlotUnavailable(f"concept {art.name!r} is already live; remove it first to replace it")
        taken = {r.slot: n for n, r in s.reservations.items()} | {c.slot: n for n, c in s.concepts.items()}
        if art.meta.slot in taken:
            raise SlotUnavailable(f"slot {art.meta.slot} of artifact {art.name!r} is held by {taken[art.meta.slot]!r}")
        return _Reservation(ADMIN, art.meta.slot, art.meta.class_word, self.clock() + self.config.reservation_ttl_s,
                            secrets.token_hex(6))

    def _owner_name(self, s: _State, client: str) -> str:
        return "admin" if client == ADMIN else s.clients[client].name

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
    def submit(self, token: str, data: bytes) -> dict[str, Any]:
        """Validate an artifact against the caller's reservation and the federation; make it live.

        The admin may also add an artifact without a reservation, into its own slot if that slot is
        free (runtime add of a concept trained elsewhere). Idempotent: the same bytes from the same
        owner, already live, return the live record."""
        with self._lock:
            client = self._authenticate(token)
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
                return {"name": art.name, "slot": live.slot, "triggers": list(live.triggers),
                        "class_word": live.class_word, "version": live.version}
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
            rows = {key: art.delta_rows(key).float() for key in self._residual}  # (|R|, n) each
            file, digest = self.store.write_concept(art.name, data) if self.store else ("", "")
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
            for key, delta in rows.items():
                self._residual[key][art.rows(key)] = delta  # exact: the slot's rows held zeros
            self._artifacts[art.name] = (art, data)
            return {"name": art.name, "slot": art.meta.slot, "triggers": list(art.meta.triggers),
                    "class_word": art.meta.class_word, "version": new.version}

    def remove(self, token: str, name: str) -> dict[str, Any]:
        """Take a live concept out (its rows of the residual become zero again) or cancel a
        reservation; allowed to the owner and to the admin."""
        with self._lock:
            who = self._authenticate(token)
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
                return {"name": name, "slot": entry.slot, "version": s.version, "removed": "reservation"}
            new = dataclasses.replace(s, version=s.version + 1,
                                      concepts={n: c for n, c in s.concepts.items() if n != name})
            self._commit(new)
            art, _ = self._artifacts.pop(name)
            for key, res in self._residual.items():
                res[art.rows(key)] = 0.0
            if self.store:
                self.store.delete_concept(entry.file)  # after the manifest: a crash leaves an orphan only
            return {"name": name, "slot": entry.slot, "version": new.version, "removed": "concept"}

    # -- reads -----------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """Counts changes of the live set (submit, remove): what a serving replica must follow."""
        return self._s.version

    def list_concepts(self) -> list[dict[str, Any]]:
        """Live concepts and current reservations, in slot order (no tokens, no tensors)."""
        with self._lock:
            s = self._expired(self._s)
            rows = [{"name": n, "owner": self._owner_name(s, c.client), "slot": c.slot, "triggers": list(c.triggers),
                     "class_word": c.class_word, "status": "live", "version": c.version, "expires_at": None}
                    for n, c in s.concepts.items()]
            rows += [{"name": n, "owner": self._owner_name(s, r.client), "slot": r.slot,
                      "triggers": trigger_names(r.slot, self.adapter.tokens_per_concept),
                      "class_word": r.class_word, "status": "reserved", "version": None,
                      "expires_at": r.expires_at} for n, r in s.reservations.items()]
            return sorted(rows, key=lambda r: r["slot"])

    def live(self) -> tuple[int, dict[str, dict[str, Any]]]:
        """(version, name -> slot, triggers, class word, sha256 and the artifact's bytes)."""
        with self._lock:
            return self._s.version, {
                n: {"slot": c.slot, "triggers": list(c.triggers), "class_word": c.class_word,
                    "sha256": c.sha256, "bytes": self._artifacts[n][1]}
                for n, c in self._s.concepts.items()}

    def merged_residual(self) -> dict[str, torch.Tensor]:
        """Target key -> Σ over live concepts of dW (m x n, float32); a copy."""
        with self._lock:
            return {k: v.clone() for k, v in self._residual.items()}

    def info(self) -> dict[str, Any]:
        with self._lock:
            s = self._expired(self._s)
            taken = len(s.concepts) + len(s.reservations)
            return {"base_spec": self.config.base, "base_fingerprint": self.base.fingerprint,
                    "resolution": self.base.resolution, "adapter": dataclasses.asdict(self.adapter),
                    "num_slots": self.adapter.num_slots, "free_slots": self.adapter.num_slots - taken,
                    "live": len(s.concepts), "reserved": len(s.reservations), "version": s.version,
                    "max_artifact_bytes": self.config.max_artifact_bytes,
                    "reservation_ttl_s": self.config.reservation_ttl_s,
                    "max_slots_per_client": self.config.max_slots_per_client,
                    "quarantined": [dataclasses.asdict(q) for q in self.quarantined],
                    "state_dir": str(self.store.root) if self.store else None}

    # -- internals -----------------------------------------------------------------------------
    def _authenticate(self, token: str) -> str:
        """The principal (client id or ADMIN) of a token; constant-time digest comparisons."""
        if not isinstance(token, str) or not token:
            raise Unauthorized("a token (string) is required; register to get one")
        digest = token_hash(token)
        admin = self._s.admin_sha256
        if admin and hmac.compare_digest(digest, admin):
            return ADMIN
        client = self._s.clients.get(token.partition(".")[0])
        if client is None or not hmac.compare_digest(digest, client.token_sha256):
            raise Unauthorized("token not recognised by this federation; register again (a token from "
                               "another federation or state folder is not valid here)")
        return token.partition(".")[0]

    def _client(self, token: str) -> str:
        who = self._authenticate(token)
        if who == ADMIN:
            raise Unauthorized("the admin token cannot reserve slots; register a client (the admin may upload a "
                               "finished artifact into its own free slot)")
        return who

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
            "base_fingerprint": self.base.fingerprint, "adapter": dataclasses.asdict(self.adapter),
            "version": s.version, "admin_sha256": s.admin_sha256,
            "clients": {k: dataclasses.asdict(v) for k, v in s.clients.items()},
            "reservations": {k: dataclasses.asdict(v) for k, v in s.reservations.items()},
            "concepts": {k: dataclasses.asdict(v) for k, v in s.concepts.items()},
        })

    def _load(self, m: Any, admin_token_sha256: str | None) -> None:
        """Rebuild from a manifest: every record checked on its own (a bad one is quarantined, see
        federation/manifest.py), every artifact re-read, re-validated and re-applied."""
        where = self.store.manifest_path
        if type(m) is not dict or m.get("format") != MANIFEST_FORMAT or m.get("format_version") != MANIFEST_VERSION:
            raise RuntimeError(f"{where} is not a {MANIFEST_FORMAT} v{MANIFEST_VERSION} manifest")
        if m.get("base_fingerprint") != self.base.fingerprint:
            raise RuntimeError(f"{where} belongs to a federation on base {ascii(m.get('base_fingerprint'))[:14]}… "
                               f"({ascii(m.get('base_spec'))[:80]}), not {self.base.fingerprint[:12]}… "
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
                   admin_sha256=admin or admin_token_sha256, clients=clients, reservations=reservations,
                   concepts={n: c for n, (c, _, _) in loaded.items()})
        for name, (_, art, data) in loaded.items():
            for key, res in self._residual.items():
                res[art.rows(key)] = art.delta_rows(key).float()
            self._artifacts[name] = (art, data)
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

    def _client_record(self, client_id: str, raw: Any) -> _Client:
        if not re.fullmatch(r"c[0-9a-f]{16}", client_id):
            raise ValueError(f"client id {client_id[:40]!a} is not c + 16 hex digits")
        rec = parse(_Client, raw, f"client {client_id}")
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
