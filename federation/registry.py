"""The federation's whole state as one plain object: people and their clients (whose tokens
`federation.auth` checks), reservations, the library of live concepts, collections and their merged
residuals. No Ray here, so every rule is tested in-process; the coordinator actor only wraps it.
Answers are `federation.protocol` types.

Memory holds every record but no artifact's tensors, except those of collection members (each
collection's merged residual is kept, exactly, as `MergedFactors`); artifacts stay files in the
state store and are read when a collection takes them in or a replica asks for one.

Every change is validated first, then committed to the state store in one transaction (an
artifact's file before the record naming it), and only then applied in memory, so a refused or
failed call leaves memory and disk exactly as they were. Reads never write: expired reservations
are filtered out on reading and purged by the next write. A mutation given a request id records
its answer in the same transaction, and a retry with that id (Ray retrying a call across a
coordinator restart, or a client retrying a timeout) gets the same answer instead of a second
effect. A lock serialises calls.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import math
import secrets
import threading
import time
from collections import Counter
from typing import Any, Callable, Iterable, Mapping

import torch

from blocklora.config import FederationConfig
from blocklora.files.safefile import write_safetensors
from blocklora.files.schema import parse
from blocklora.method.artifact import ConceptArtifact, InvalidArtifact, check_class_word, check_name
from blocklora.method.export import MergedFactors
from blocklora.method.slots import SlotSpace
from federation import library
from federation.auth import ADMIN, CODE_RE, TOKEN_RE, Accounts, Client, Person, check_person_name, name_key, token_hash
from federation.errors import (
    ArtifactRejected,
    FederationError,
    ReservationError,
    SlotClash,
    SlotUnavailable,
    StateUnavailable,
    Unauthorized,
    UnknownConcept,
)
from federation.manifest import RecordChecks, refused, sift
from federation.protocol import (
    Collection,
    ConceptPage,
    ConceptQuery,
    FederationInfo,
    Grant,
    HeldSlot,
    Invitation,
    LiveConcept,
    Mergeable,
    Plan,
    Principal,
    Quarantined,
    Registration,
    Removed,
    Resolved,
    TrainingProgress,
)
from federation.records import (
    DEFAULT,
    FORMAT,
    FORMAT_VERSION,
    REQUEST_TTL_S,
    Answered,
    CollectionRecord,
    ConceptRecord,
    Reservation,
    check_request_id,
    from_manifest,
    to_json,
)
from federation.store import Key, StateStore

MERGE_RULES = ("sum", "mean")  # α = 1 each, or the paper's α = 1/|S|
MAX_QUOTA, MAX_USES = 100_000, 100
MAX_STEPS = 10**9  # the most steps a training progress report may claim
log = logging.getLogger(__name__)


def _fingerprint(kind: str, key: str, record: Any) -> int:
    """One record's share of the live-set digest (XOR of all shares: updated per change in O(1))."""
    what = record.sha256 if kind == "concept" else ",".join(record.members)
    return int.from_bytes(hashlib.sha256(f"{kind}\0{key}\0{what}".encode()).digest()[:16], "big")


class Registry:
    """One federation: a base (fingerprint), an AdapterConfig (K slots, rank, targets), its library.

    It never sees the base itself, only what fits it (`space`: `SlotSpace.of(base, adapter)`, which
    carries the adapter and the base's native resolution) and the dtype of the merged LoRAs it serves.
    """

    def __init__(self, space: SlotSpace, config: FederationConfig, store: StateStore,
                 admin_token_sha256: str | None = None, clock: Callable[[], float] = time.time,
                 dtype: torch.dtype = torch.float32) -> None:
        """Loads the state in `store` (it must be for the same base and adapter), migrating a
        pre-SQLite manifest.json on the way."""
        self.space, self.config, self.store, self.clock, self.dtype = space, config, store, clock, dtype
        self.adapter, self.resolution = space.adapter, space.resolution
        self._lock = threading.RLock()
        self.accounts = Accounts(admin_token_sha256)
        self.concepts: dict[str, ConceptRecord] = {}  # name key -> record
        self.reservations: dict[str, Reservation] = {}
        self.collections: dict[str, CollectionRecord] = {}
        self.requests: dict[str, Answered] = {}
        self._tables: dict[str, dict[str, Any]] = {
            "person": self.accounts.people, "client": self.accounts.clients, "reservation": self.reservations,
            "concept": self.concepts, "collection": self.collections, "request": self.requests}
        self.version, self._digest = 0, 0
        self._names: list[str] = []  # sorted keys of concepts and reservations: the listing's order
        self._slot_use: Counter[int] = Counter()  # live concepts per slot
        self._merged: dict[str, MergedFactors] = {}  # collection key -> its members' factors
        self._arts: dict[str, ConceptArtifact] = {}  # concept key -> artifact, while a collection holds it
        self.quarantined: list[Quarantined] = []  # records set aside when the state was loaded
        # reservation key -> (its run's id, the training job's latest report): shown, never stored
        self._progress: dict[str, tuple[str, TrainingProgress]] = {}
        self.checks = RecordChecks(space, store, config.base, config.max_artifact_bytes)
        self._load(admin_token_sha256)

    def close(self) -> None:
        self.store.close()

    # -- people and clients ----------------------------------------------------------------------
    def invite(self, token: str, name: str, code: str, quota: int | None = None, uses: int = 1,
               ttl_s: float | None = None) -> Invitation:
        """A new person (admin only); `code` (federation.auth.new_invitation_code, drawn by the
        admin's side) lets them register `uses` clients. Asked again with the same code: the same answer."""
        with self._lock:
            self.accounts.require_admin(token, "invite people")
            name = check_person_name(name)
            quota = self.config.max_concepts_per_person if quota is None else quota
            ttl_s = self.config.invitation_ttl_s if ttl_s is None else ttl_s
            for what, value, top in (("quota", quota, MAX_QUOTA), ("uses", uses, MAX_USES)):
                if type(value) is not int or not 1 <= value <= top:
                    raise FederationError(f"{what} must be an integer in 1..{top:,}, got {ascii(value)[:40]}")
            if type(ttl_s) not in (int, float) or not 0 < ttl_s <= 365 * 86400:
                raise FederationError(f"ttl_s must be 0-365 days in seconds, got {ascii(ttl_s)[:40]}")
            if type(code) is not str or not CODE_RE.fullmatch(code):
                raise FederationError("an invitation code is p<16 hex>.<32-128 URL-safe characters>; draw one with "
                                      "federation.auth.new_invitation_code()")
            pid = code.partition(".")[0]
            known = self.accounts.people.get(pid)
            if known is not None and known.invitation_sha256 == token_hash(code):
                return Invitation(known.name, code, known.quota, known.uses_left, known.expires_at)  # a retry
            if known is not None:
                raise FederationError("this invitation code's id is taken; draw another code")
            other = self.accounts.person_named(name)
            if other is not None:
                raise FederationError(f"a person named {self.accounts.people[other].name!r} is already invited; "
                                      "names are unique regardless of case. Pick another name")
            person = Person(name, quota, token_hash(code), uses, self.clock() + ttl_s)
            self._commit({("person", pid): person})
            return Invitation(name, code, quota, uses, person.expires_at)

    def register(self, invitation: str, token: str) -> Registration:
        """A new client of the invited person, with the token the client drew
        (federation.auth.new_client_token); only its sha256 is kept. A retry with the same token
        gets the same answer and uses the invitation once."""
        with self._lock:
            if type(token) is not str or not TOKEN_RE.fullmatch(token):
                raise FederationError("a client token is c<16 hex>.<32-128 URL-safe characters>; draw one with "
                                      "federation.auth.new_client_token()")
            cid = token.partition(".")[0]
            known = self.accounts.clients.get(cid)
            if known is not None and known.token_sha256 == token_hash(token):
                return Registration(cid, token, self.accounts.name(cid))
            if known is not None:
                raise FederationError("this token's client id is taken; draw another token")
            pid = self.accounts.redeem(invitation, self.clock())
            person = self.accounts.people[pid]
            self._commit({("client", cid): Client(pid, token_hash(token)),
                          ("person", pid): dataclasses.replace(person, uses_left=person.uses_left - 1)})
            return Registration(cid, token, person.name)

    def whoami(self, token: str) -> Principal:
        """Who a token authenticates as (a client's saved token is checked with this before reuse)."""
        with self._lock:
            return self.accounts.whoami(token)

    # -- slots -----------------------------------------------------------------------------------
    def reserve(self, token: str, name: str, class_word: str, with_: list[str] | tuple[str, ...] = (),
                request_id: str | None = None) -> Grant:
        """Hold a slot for concept `name` until the TTL (asking again renews the same slot): a slot
        none of the concepts named in `with_` holds, chosen as federation/library.py says."""
        with self._lock:
            client = self.accounts.client(token)
            replay = self._replay(client, "reserve", request_id, Grant)
            if replay is not None:
                return replay
            try:
                check_name(name)
                class_word = check_class_word(class_word)  # the rule an uploaded artifact meets too
            except InvalidArtifact as err:
                raise ReservationError(str(err)) from None
            avoid = self._slots_of(library.check_names(with_, "'with'"), "'with'")
            key, now = name_key(name), self.clock()
            live = self.concepts.get(key)
            if live is not None:
                raise SlotUnavailable(f"concept {live.name!r} is already live (in slot {live.slot}); names are unique "
                                      "regardless of case: pick another name, or remove it first")
            held = self._held(key, now)
            if held is not None and held.client != client:
                raise ReservationError(f"concept name {held.name!r} is reserved by another client until "
                                       f"{time.ctime(held.expires_at)}; names are unique regardless of case: "
                                       "pick another")
            if held is not None and held.name != name:
                raise ReservationError(f"you hold the reservation as {held.name!r}; reserve it under that spelling")
            if held is not None and held.slot in avoid:
                raise SlotClash(f"your reservation of {name!r} holds slot {held.slot}, as does {avoid[held.slot]!r} "
                                "named in 'with'; cancel the reservation (remove it) and reserve again")
            person = self.accounts.person_of(client)
            if held is None:
                self._check_quota(person, now)
            slot = held.slot if held else library.choose_slot(self.adapter.num_slots, self._use(now),
                                                              self._own(person, now), avoid)
            res = Reservation(name, client, slot, class_word, now + self.config.reservation_ttl_s,
                              held.id if held else secrets.token_hex(6), held.reserved_at if held else now)
            peers = [c.name for c in self.concepts.values() if c.slot == slot]
            grant = Grant(name=name, slot=slot, class_word=class_word, triggers=self._triggers(slot),
                          adapter=self.adapter, base_spec=self.config.base, base_fingerprint=self.space.fingerprint,
                          resolution=self.resolution, expires_at=res.expires_at, reservation_id=res.id,
                          slot_peers=len(peers), peer_names=tuple(sorted(peers)[:8]))
            self._commit({("reservation", key): res}, answer=(client, "reserve", request_id, grant))
            return grant

    def _triggers(self, slot: int) -> tuple[str, ...]:
        return self.checks.triggers(slot)

    def _held(self, key: str, now: float) -> Reservation | None:
        held = self.reservations.get(key)
        return held if held is not None and held.expires_at > now else None

    def _use(self, now: float) -> Counter[int]:
        """Live concepts and current reservations per slot."""
        return self._slot_use + Counter(r.slot for r in self.reservations.values() if r.expires_at > now)

    def _own(self, person: str, now: float) -> Counter[int]:
        """The same, for one person's concepts and reservations (over all their clients)."""
        mine = [c.slot for c in self.concepts.values() if self.accounts.person_of(c.client) == person]
        return Counter(mine + [r.slot for r in self.reservations.values()
                               if r.expires_at > now and self.accounts.person_of(r.client) == person])

    def _check_quota(self, person: str, now: float) -> None:
        """What a person holds over all their clients: live concepts and reservations count alike."""
        if person == ADMIN:
            return
        quota, held = self.accounts.people[person].quota, sum(self._own(person, now).values())
        if held >= quota:
            raise SlotUnavailable(f"{self.accounts.people[person].name!r} already holds {held} concept(s) and "
                                  f"reservation(s), the most their invitation allows ({quota}); remove a concept or "
                                  "cancel a reservation")

    def _slots_of(self, names: Iterable[str], what: str) -> dict[int, str]:
        """slot -> name for live or reserved concepts named by a client (any spelling's case)."""
        now, out, unknown = self.clock(), {}, []
        for n in names:
            entry = self.concepts.get(name_key(n)) or self._held(name_key(n), now)
            if entry is None:
                unknown.append(n)
            else:
                out.setdefault(entry.slot, entry.name)
        if unknown:
            raise UnknownConcept(f"{what} names {unknown}, which are neither live nor reserved; see GET /v1/concepts")
        return out

    # -- concepts ------------------------------------------------------------------------------
    def submit(self, token: str, data: bytes, request_id: str | None = None) -> LiveConcept:
        """Validate an artifact against the caller's reservation and the federation; make it live,
        and a member of the default collection if its slot there is free.

        The admin may also add an artifact without a reservation, into its own slot, under a name
        nobody holds (runtime add of a concept trained elsewhere). The same bytes from the same owner,
        already live, return the live record."""
        with self._lock:
            client = self.accounts.authenticate(token)
            replay = self._replay(client, "submit", request_id, LiveConcept)
            if replay is not None:
                return replay
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
            key, now = name_key(art.name), self.clock()
            live = self.concepts.get(key)
            if live is not None and live.client == client and live.sha256 == hashlib.sha256(data).hexdigest():
                return self._live_concept(key)  # a retry of a submit that went live (its reply lost in a restart)
            held = self._held(key, now)
            if held is None and client == ADMIN and live is None:
                held = Reservation(art.name, ADMIN, art.meta.slot, art.meta.class_word, now, "admin", now)
            if live is not None:
                raise SlotUnavailable(f"concept {live.name!r} is already live; remove it first to replace it")
            if held is None:
                raise ReservationError(f"no reservation for concept {art.name!r} (never made, or expired after "
                                       f"{self.config.reservation_ttl_s:.0f} s); reserve a slot and train for it")
            if held.client != client:
                raise ReservationError(f"concept {art.name!r} is reserved by another client; a client may only "
                                       "submit the concepts it reserved")
            if held.name != art.name:
                raise ReservationError(f"artifact {art.name!r} is not the reserved name {held.name!r}; names are "
                                       "unique regardless of case, but an artifact carries the reserved spelling")
            if art.meta.slot != held.slot:
                raise ReservationError(f"artifact {art.name!r} was trained for slot {art.meta.slot}, but the "
                                       f"reservation is for slot {held.slot}; train again with the reserved slot")
            if art.meta.class_word != held.class_word:
                raise ReservationError(f"artifact {art.name!r} has class word {art.meta.class_word!r}, but it was "
                                       f"reserved as {held.class_word!r}; train again with --class-word "
                                       f"{held.class_word!r}, or reserve under another name")
            try:
                self.space.check(art)
            except InvalidArtifact as err:
                raise ArtifactRejected(f"artifact refused: {err}") from None
            file, digest = self.store.write_concept(art.name, data)
            concept = ConceptRecord(art.name, client, art.meta.slot, art.meta.class_word, art.meta.triggers, file,
                                    digest, self.version + 1, now)
            put: dict[Key, Any] = {("concept", key): concept}
            default = self.collections[DEFAULT]
            joins = all(self.concepts[m].slot != concept.slot for m in default.members)
            if joins:
                put[("collection", DEFAULT)] = dataclasses.replace(default, members=(*default.members, key),
                                                                   version=self.version + 1)
            answer = LiveConcept(name=art.name, slot=concept.slot, triggers=concept.triggers,
                                 class_word=concept.class_word, owner=self.accounts.name(client),
                                 version=concept.version, sha256=digest, live_at=now)
            try:
                self._commit(put, [("reservation", key), ("file", file)], bump=True,
                             answer=(client, "submit", request_id, answer))
            except BaseException:
                self._discard(file)
                raise
            self._progress.pop(key, None)
            if joins:
                self._arts[key] = art
                self._merged[DEFAULT].add(art)  # its own factors: the other members' are untouched
            return answer

    def _discard(self, file: str) -> None:
        """Undo a written artifact whose record did not commit (what fails here, clean-up finishes)."""
        try:
            self.store.delete_concept(file)
        except StateUnavailable:
            log.warning("could not delete %s after a failed commit; the next start removes it", file)

    def remove(self, token: str, name: str, request_id: str | None = None) -> Removed:
        """Take a live concept out (it leaves every collection, whose merged residuals lose its
        factors) or cancel a reservation; allowed to the owner (any client of the same person) and
        to the admin."""
        with self._lock:
            who = self.accounts.authenticate(token)
            replay = self._replay(who, "remove", request_id, Removed)
            if replay is not None:
                return replay
            if type(name) is not str:
                raise UnknownConcept(f"a concept name is a string, got {type(name).__name__}")
            key = name_key(name)
            entry = self.concepts.get(key) or self._held(key, self.clock())
            if entry is None or entry.name != name:
                raise UnknownConcept(f"no live concept or reservation named {name[:80]!r}; see GET /v1/concepts")
            if who != ADMIN and self.accounts.person_of(entry.client) != self.accounts.person_of(who):
                raise Unauthorized(f"concept {name!r} belongs to another person; only its owner or the admin may "
                                   "remove it")
            if key not in self.concepts:
                answer = Removed(name, entry.slot, self.version, "reservation")
                self._commit(delete=[("reservation", key)], answer=(who, "remove", request_id, answer))
                self._progress.pop(key, None)
                return answer
            version = self.version + 1
            holding = {c: r for c, r in self.collections.items() if key in r.members}
            put: dict[Key, Any] = {("collection", c): dataclasses.replace(
                r, members=tuple(m for m in r.members if m != key), version=version) for c, r in holding.items()}
            put[("file", entry.file)] = "deleting"
            answer = Removed(name, entry.slot, version, "concept")
            self._commit(put, [("concept", key)], bump=True, answer=(who, "remove", request_id, answer))
            for c in holding:
                self._merged[c].remove(entry.name)
            self._arts.pop(key, None)
            self.store.delete_concept(entry.file)  # after the record: a crash leaves an intent, finished at start
            return answer

    def progress(self, name: str, reservation_id: str, step: int, steps: int, eta_s: float | None) -> bool:
        """Note the step a client job training for reservation `name` has reached, for listings.

        The reservation id (in the grant, never in a listing) stands in for the token: the report
        changes nothing but what listings show, and is kept in memory only. False, and nothing kept,
        when the reservation is gone or was made again for another run (a late report is not an
        error to its sender)."""
        if not (type(step) is int and type(steps) is int and 0 <= step <= steps <= MAX_STEPS):
            raise FederationError(f"progress needs integers 0 <= step <= steps <= {MAX_STEPS}, "
                                  f"got step={ascii(step)[:40]}, steps={ascii(steps)[:40]}")
        if eta_s is not None and not (type(eta_s) in (int, float) and math.isfinite(eta_s) and eta_s >= 0):
            raise FederationError(f"progress: eta_s must be a finite number of seconds >= 0 or None, got "
                                  f"{ascii(eta_s)[:40]}")
        with self._lock:
            now = self.clock()
            key = name_key(name) if type(name) is str else ""
            held = self._held(key, now)
            self._progress = {k: p for k, p in self._progress.items() if self._held(k, now) is not None}
            if held is None or held.name != name or held.id != reservation_id:
                return False
            self._progress[key] = (held.id, TrainingProgress(step, steps, None if eta_s is None else float(eta_s), now))
            return True

    # -- collections ---------------------------------------------------------------------------
    def put_collection(self, token: str, name: str, members: list[str] | tuple[str, ...],
                       request_id: str | None = None) -> Collection:
        """Create a collection, or set the members of one (its owner or the admin; the default
        collection: the admin). Members are live concepts in pairwise different slots; the merged
        residual changes by the members that come and go, nothing else."""
        with self._lock:
            who = self.accounts.authenticate(token)
            replay = self._replay(who, "put_collection", request_id, Collection)
            if replay is not None:
                return replay
            try:
                check_name(name)
            except InvalidArtifact as err:
                raise FederationError(str(err).replace("concept name", "collection name")) from None
            names = library.check_names(members, "members")
            key = name_key(name)
            old = self.collections.get(key)
            if old is not None and old.name != name:
                raise FederationError(f"the collection is named {old.name!r}; names are unique regardless of case")
            if old is not None and who != ADMIN and (old.owner == ADMIN or self.accounts.person_of(old.owner)
                                                     != self.accounts.person_of(who)):
                raise Unauthorized(f"collection {name!r} belongs to {self.accounts.name(old.owner)!r}; only its "
                                   "owner or the admin may change it")
            if old is None and who != ADMIN:
                person = self.accounts.person_of(who)
                owned = sum(self.accounts.person_of(c.owner) == person for c in self.collections.values()
                            if c.owner != ADMIN)
                if owned >= self.config.max_collections_per_person:
                    raise SlotUnavailable(f"{self.accounts.name(who)!r} already owns {owned} collection(s), the most "
                                          f"one person may (max_collections_per_person = "
                                          f"{self.config.max_collections_per_person}); delete one first")
            keys = tuple(name_key(n) for n in names)
            unknown = [n for n, k in zip(names, keys) if k not in self.concepts or self.concepts[k].name != n]
            if unknown:
                raise UnknownConcept(f"members {unknown} are not live concepts; see GET /v1/concepts")
            library.refuse_clashes({self.concepts[k].name: self.concepts[k].slot for k in keys}, f"collection {name!r}")
            before = old.members if old else ()
            joining = [k for k in keys if k not in before]
            arts = {k: self._artifact(k) for k in joining}  # read before the commit: a bad file changes nothing
            record = CollectionRecord(name, old.owner if old else who, keys, self.version + 1)
            answer = self._collection(record)
            self._commit({("collection", key): record}, bump=True, answer=(who, "put_collection", request_id, answer))
            merged = self._merged.setdefault(key, MergedFactors(self.space.layout, self.dtype))
            for k in before:
                if k not in keys:
                    merged.remove(self.concepts[k].name)
            for k, art in arts.items():
                merged.add(art)
                self._arts[k] = art
            self._forget_unheld()
            return answer

    def delete_collection(self, token: str, name: str, request_id: str | None = None) -> Collection:
        with self._lock:
            who = self.accounts.authenticate(token)
            replay = self._replay(who, "delete_collection", request_id, Collection)
            if replay is not None:
                return replay
            record = self._collection_named(name)
            if record.name == DEFAULT:
                raise FederationError("the default collection cannot be deleted; set its members instead")
            if who != ADMIN and (record.owner == ADMIN or
                                 self.accounts.person_of(record.owner) != self.accounts.person_of(who)):
                raise Unauthorized(f"collection {name!r} belongs to {self.accounts.name(record.owner)!r}; only its "
                                   "owner or the admin may delete it")
            answer = dataclasses.replace(self._collection(record), version=self.version + 1)
            self._commit(delete=[("collection", name_key(name))], bump=True,
                         answer=(who, "delete_collection", request_id, answer))
            del self._merged[name_key(name)]
            self._forget_unheld()
            return answer

    def _artifact(self, key: str) -> ConceptArtifact:
        """A live concept's artifact: the one in memory while a collection holds it, else its file."""
        return self._arts[key] if key in self._arts else self.checks.member_artifact(self.concepts[key])

    def _forget_unheld(self) -> None:
        held = {m for c in self.collections.values() for m in c.members}
        for key in [k for k in self._arts if k not in held]:
            del self._arts[key]

    def _collection_named(self, name: object) -> CollectionRecord:
        record = self.collections.get(name_key(name)) if type(name) is str else None
        if record is None or record.name != name:
            raise UnknownConcept(f"no collection named {ascii(name)[:80]}; see GET /v1/collections")
        return record

    def _collection(self, record: CollectionRecord) -> Collection:
        return Collection(record.name, self.accounts.name(record.owner),
                          {self.concepts[k].name: self.concepts[k].slot for k in record.members}, record.version)

    def collection(self, name: str) -> Collection:
        with self._lock:
            return self._collection(self._collection_named(name))

    def list_collections(self) -> list[Collection]:
        """Every collection, by name (their number is bounded by the per-person limit)."""
        with self._lock:
            return [self._collection(r) for _, r in sorted(self.collections.items())]

    # -- merging ---------------------------------------------------------------------------------
    def mergeable(self, names: list[str] | tuple[str, ...]) -> Mergeable:
        """Can these concepts be merged into one picture, and if not, which pairs share a slot."""
        with self._lock:
            names = library.check_names(names, "concepts")
            known = {n: self.concepts[name_key(n)].slot for n in names
                     if name_key(n) in self.concepts and self.concepts[name_key(n)].name == n}
            found = library.clashes(known)
            return Mergeable(not found and len(known) == len(names), known, tuple(found),
                             tuple(n for n in names if n not in known))

    def resolve(self, subset: Mapping[str, float], collection: str | None = None) -> Plan:
        """What a generate request merges: the concepts it names (name -> α) and, with
        `collection`, that collection's members at α = 1 unless named with another weight. Refused
        when a concept is not live (UnknownConcept) or two share a slot (SlotClash)."""
        with self._lock:
            wanted: dict[str, float] = {}
            if collection is not None:
                record = self._collection_named(collection)
                wanted = {self.concepts[k].name: 1.0 for k in record.members}
            for n, w in subset.items():
                if type(w) not in (int, float) or not math.isfinite(w):
                    raise FederationError(f"the weight of {ascii(n)[:80]} must be a finite number, got {ascii(w)[:40]}")
            wanted |= dict(subset)
            library.check_names(list(wanted), "concepts")
            missing = [n for n in wanted if name_key(n) not in self.concepts or self.concepts[name_key(n)].name != n]
            if missing:
                raise UnknownConcept(f"concept(s) {missing} are not live (version {self.version}); "
                                     "see GET /v1/concepts")
            records = {n: self.concepts[name_key(n)] for n in wanted}
            library.refuse_clashes({n: c.slot for n, c in records.items()}, "one picture")
            return Plan(self.version, tuple(Resolved(n, c.slot, c.sha256, f"{' '.join(c.triggers)} {c.class_word}",
                                                     float(wanted[n])) for n, c in records.items()))

    def artifact(self, name: str, sha256: str) -> bytes:
        """A live concept's artifact as uploaded (what a replica loads), read from the state folder;
        `sha256` is the one its plan named, so a replaced concept is never served as the old one."""
        with self._lock:
            c = self.concepts.get(name_key(name)) if type(name) is str else None
            if c is None or c.name != name or c.sha256 != sha256:
                raise UnknownConcept(f"concept {ascii(name)[:80]} with sha256 {ascii(sha256)[:20]} is not live "
                                     "(removed or replaced since the request was checked)")
            file = c.file
        return self.store.read_concept(file, sha256)

    def merged_residual(self, collection: str = DEFAULT) -> dict[str, torch.Tensor]:
        """Target key -> Σ over the collection's members of dW (m x n, the base's dtype), formed now."""
        with self._lock:
            return self._merged[name_key(self._collection_named(collection).name)].dense()

    def merged_lora(self, rule: str = "sum", collection: str = DEFAULT) -> tuple[int, bytes]:
        """(version, a collection as one standard LoRA safetensors file): diffusers'
        `pipe.load_lora_weights` applies W0 + Σ α dW with α = 1 ("sum") or 1/|S| ("mean")."""
        if rule not in MERGE_RULES:
            raise FederationError(f"merge rule {ascii(rule)[:40]} is not offered; use one of {list(MERGE_RULES)}")
        with self._lock:
            record = self._collection_named(collection)
            if not record.members:
                raise UnknownConcept(f"collection {record.name!r} has no concept: there is nothing to download yet")
            alpha = 1.0 / len(record.members) if rule == "mean" else 1.0
            members = {self.concepts[k].name: self.concepts[k] for k in record.members}
            about = {n: {"slot": c.slot, "triggers": list(c.triggers), "class_word": c.class_word}
                     for n, c in members.items()}
            factors = self._merged[name_key(record.name)].lora_state_dict(dict.fromkeys(members, alpha))
            data = write_safetensors(factors, {
                "format": "blocklora-merged-lora", "version": str(self.version), "rule": rule,
                "collection": record.name, "base_fingerprint": self.space.fingerprint,
                "concepts": json.dumps(about, sort_keys=True)})
            return self.version, data

    # -- reads -----------------------------------------------------------------------------------
    def list_concepts(self, query: ConceptQuery = ConceptQuery()) -> ConceptPage:
        """One page of live concepts and current reservations in name order, filtered (no tokens,
        no tensors). A page walks the names the prefix allows (the total counts every match)."""
        with self._lock:
            after = library.check_query(query, self.adapter.num_slots)
            members = None
            if query.collection is not None:
                members = set(self._collection_named(query.collection).members)
            now, owner = self.clock(), query.owner and name_key(query.owner)
            prefix = query.prefix and name_key(query.prefix)

            def keep(key: str) -> bool:
                if members is not None and key not in members:
                    return False
                entry = self.concepts.get(key)
                if entry is None:
                    entry = self._held(key, now)
                    if entry is None or query.status == "live":
                        return False
                elif query.status == "reserved":
                    return False
                return not (query.slot is not None and entry.slot != query.slot
                            or query.class_word is not None and entry.class_word != query.class_word
                            or owner and name_key(self.accounts.name(entry.client)) != owner)

            items, total, shown = [], 0, 0
            for i in range(bisect.bisect_left(self._names, prefix) if prefix else 0, len(self._names)):
                key = self._names[i]
                if prefix and not key.startswith(prefix):
                    break
                if not keep(key):
                    continue
                total += 1
                if after is None or key > after:
                    shown += 1
                    if len(items) < query.limit:
                        items.append(self._live_concept(key) if key in self.concepts else self._held_slot(key))
            more = shown > len(items)
            return ConceptPage(self.version, total, tuple(items),
                               library.encode_cursor(name_key(items[-1].name)) if more else None)

    def info(self) -> FederationInfo:
        with self._lock:
            now = self.clock()
            use = self._use(now)
            return FederationInfo(
                base_spec=self.config.base, base_fingerprint=self.space.fingerprint, resolution=self.resolution,
                adapter=self.adapter, live=len(self.concepts),
                reserved=sum(r.expires_at > now for r in self.reservations.values()),
                slot_use=tuple(use[k] for k in range(self.adapter.num_slots)), collections=len(self.collections),
                people=len(self.accounts.people), version=self.version,
                max_artifact_bytes=self.config.max_artifact_bytes,
                reservation_ttl_s=self.config.reservation_ttl_s,
                max_concepts_per_person=self.config.max_concepts_per_person,
                quarantined=tuple(self.quarantined), state_dir=str(self.store.root))

    def _live_concept(self, key: str) -> LiveConcept:
        c = self.concepts[key]
        return LiveConcept(name=c.name, slot=c.slot, triggers=c.triggers, class_word=c.class_word,
                           owner=self.accounts.name(c.client), version=c.version, sha256=c.sha256,
                           live_at=c.live_at)

    def _held_slot(self, key: str) -> HeldSlot:
        r = self.reservations[key]
        return HeldSlot(name=r.name, slot=r.slot, triggers=self._triggers(r.slot), class_word=r.class_word,
                        owner=self.accounts.name(r.client), expires_at=r.expires_at, reserved_at=r.reserved_at,
                        progress=self._reported(key, r))

    def _reported(self, key: str, held: Reservation) -> TrainingProgress | None:
        """The latest progress of the run behind this reservation (not of an earlier one of the name)."""
        run, progress = self._progress.get(key, ("", None))
        return progress if run == held.id else None

    # -- commits -----------------------------------------------------------------------------------
    def _replay(self, principal: str, method: str, request_id: str | None, cls: type) -> Any:
        """The recorded answer of a retried mutation, or None for a new request."""
        if request_id is None:
            return None
        check_request_id(request_id)
        done = self.requests.get(request_id)
        if done is None:
            return None
        if (done.principal, done.method) != (principal, method):
            raise FederationError(f"request id {request_id!r} was already used for another call; draw a new one "
                                  "per call")
        return parse(cls, done.answer, f"the answer to request {request_id}")

    def _commit(self, put: Mapping[Key, Any] | None = None, delete: Iterable[Key] = (), bump: bool = False,
                answer: tuple[str, str, str | None, Any] | None = None) -> None:
        """Persist one change (plus the purge of expired reservations and old answers, and the
        answer of the request that made it), then apply it in memory."""
        put, delete, now = dict(put or {}), set(delete), self.clock()
        delete |= {("reservation", k) for k, r in self.reservations.items()
                   if r.expires_at <= now and ("reservation", k) not in put}
        delete |= {("request", k) for k, a in self.requests.items() if a.at < now - REQUEST_TTL_S}
        if answer is not None and answer[2] is not None:
            principal, method, request_id, reply = answer
            put[("request", request_id)] = Answered(principal, method, reply.to_dict(), now)
        digest = self._digest
        for kind, key in [*delete, *put]:
            if kind in ("concept", "collection"):
                old = self._tables[kind].get(key)
                digest ^= _fingerprint(kind, key, old) if old is not None else 0
                if (kind, key) in put:
                    digest ^= _fingerprint(kind, key, put[(kind, key)])
        version = self.version + 1 if bump else self.version
        if bump or digest != self._digest:
            put[("meta", "state")] = {"version": version, "digest": f"{digest:032x}"}
        self.store.commit({k: to_json(v) for k, v in put.items()}, delete)
        self._apply(put, delete)
        self.version, self._digest = version, digest

    def _apply(self, put: Mapping[Key, Any], delete: Iterable[Key]) -> None:
        for kind, key in delete:
            old = self._tables.get(kind, {}).pop(key, None)
            if kind == "concept" and old is not None:
                self._slot_use[old.slot] -= 1
            if kind in ("concept", "reservation") and key not in self.concepts and key not in self.reservations:
                i = bisect.bisect_left(self._names, key)
                if i < len(self._names) and self._names[i] == key:
                    del self._names[i]
        for (kind, key), record in put.items():
            if kind not in self._tables:  # "meta" and the store's own "file" intents
                continue
            if kind == "concept":
                old = self.concepts.get(key)
                self._slot_use[record.slot] += 1 - (old is not None and old.slot == record.slot)
            self._tables[kind][key] = record
            if kind in ("concept", "reservation"):
                i = bisect.bisect_left(self._names, key)
                if i == len(self._names) or self._names[i] != key:
                    self._names.insert(i, key)

    # -- loading -----------------------------------------------------------------------------------
    def _identity(self, admin_sha256: str | None) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "base_spec": self.config.base,
                "base_fingerprint": self.space.fingerprint, "adapter": dataclasses.asdict(self.adapter),
                "admin_sha256": admin_sha256}

    def _load(self, admin_token_sha256: str | None) -> None:
        """Rebuild from the store: every record checked on its own (a bad one is quarantined, see
        federation/manifest.py), every artifact file checked against its digest, every collection
        member's artifact re-read and re-validated. Any change of the live set this makes (a record
        set aside, a record removed by hand) raises the version, so ingress and replicas drop it."""
        legacy = self.store.legacy_manifest()
        if legacy is not None:
            self.store.commit(from_manifest(legacy, self.config.max_concepts_per_person))
            self.store.retire_manifest()
            log.warning("migrated %s/manifest.json into %s (kept as manifest.json.migrated)", self.store.root,
                        self.store.db)
        raw = self.store.load()
        meta = raw.pop("meta", {})
        if "federation" not in meta:
            if raw:
                raise RuntimeError(f"{self.store.root} holds records but no federation identity; it was not written "
                                   "by this coordinator. Use another state folder")
            self.accounts.admin_sha256 = admin_token_sha256
            self._commit({("meta", "federation"): self._identity(admin_token_sha256),
                          ("collection", DEFAULT): CollectionRecord(DEFAULT, ADMIN, (), 0)})
            self._merged[DEFAULT] = MergedFactors(self.space.layout, self.dtype)
            return
        checks = self.checks
        admin = checks.identity(meta["federation"])
        if admin is False:
            self.quarantined.append(Quarantined("admin", "admin_sha256", "not a sha256 hex digest; the admin token "
                                                                         "given at start-up (if any) is used instead"))
        admin = admin or admin_token_sha256
        bad: dict[Key, Quarantined] = {}

        def take(kind: str, build: Callable[[str, Any], Any]) -> dict[str, Any]:
            kept, refusals = sift(kind, raw.get(kind, {}), build)
            bad.update({(kind, k): q for k, q in refusals.items()})
            return kept

        people = take("person", checks.person)
        seen: dict[str, str] = {}
        for pid, p in list(people.items()):
            if name_key(p.name) in seen:
                bad[("person", pid)] = refused("person", pid,
                                               f"name {p.name!r} is also person {seen[name_key(p.name)]}'s")
                del people[pid]
            seen.setdefault(name_key(p.name), pid)
        clients = take("client", lambda k, v: checks.client(k, v, people))
        owners = {*clients, ADMIN}
        concepts = take("concept", lambda k, v: checks.concept(k, v, owners))
        reservations = take("reservation", lambda k, v: checks.reservation(k, v, owners, concepts))
        collections = take("collection", lambda k, v: checks.record(CollectionRecord, "collection", k, v, owners,
                                                                    "owner"))
        requests = take("request", checks.answered)
        if DEFAULT not in collections:  # a migrated federation: its live set, as it was, is the default
            first: dict[int, str] = {}
            for key, c in sorted(concepts.items(), key=lambda kv: kv[1].version):
                first.setdefault(c.slot, key)
            collections[DEFAULT] = CollectionRecord(DEFAULT, ADMIN, tuple(first.values()), 0)
        arts: dict[str, ConceptArtifact] = {}
        for key in {m for c in collections.values() for m in c.members if m in concepts}:
            try:
                arts[key] = checks.member_artifact(concepts[key])
            except (InvalidArtifact, RuntimeError, OSError, ValueError) as err:
                bad[("concept", key)] = refused("concept", key, str(err))
                del concepts[key]
        for ckey, c in list(collections.items()):
            slots: dict[int, str] = {}
            kept = []
            for m in c.members:
                if m not in concepts:
                    self.quarantined.append(refused("collection member", f"{c.name}/{m}", "not a live concept"))
                elif concepts[m].slot in slots:
                    self.quarantined.append(refused("collection member", f"{c.name}/{m}",
                                                    f"slot {concepts[m].slot} is {slots[concepts[m].slot]!r}'s"))
                else:
                    slots[concepts[m].slot] = m
                    kept.append(m)
            collections[ckey] = dataclasses.replace(c, members=tuple(kept))
        if bad:
            self.quarantined += list(bad.values())
            records = {k: raw.get(k[0], {}).get(k[1]) for k in bad}
            in_use = {c.file for c in concepts.values()}  # a bad record may name a good one's file: it stays
            files = [v.get("file") for (kind, _), v in records.items() if kind == "concept" and type(v) is dict
                     and type(v.get("file")) is str and v.get("file") not in in_use]
            self.store.quarantine([dataclasses.asdict(q) for q in bad.values()], records, files)
        self.store.clean({c.file for c in concepts.values()}, raw.get("file", {}))
        state = meta.get("state") if type(meta.get("state")) is dict else {}
        version = state.get("version") if type(state.get("version")) is int else 0
        self.version = max([version, *(c.version for c in [*concepts.values(), *collections.values()])])
        self.accounts.admin_sha256 = admin
        self._apply({**{("person", k): v for k, v in people.items()}, **{("client", k): v for k, v in clients.items()},
                     **{("concept", k): v for k, v in concepts.items()},
                     **{("reservation", k): v for k, v in reservations.items()},
                     **{("collection", k): v for k, v in collections.items()},
                     **{("request", k): v for k, v in requests.items()}}, ())
        for kind in ("concept", "collection"):
            for key, record in self._tables[kind].items():
                self._digest ^= _fingerprint(kind, key, record)
        changed = state.get("digest") != f"{self._digest:032x}"  # a record set aside, or removed by hand
        put: dict[Key, Any] = {("collection", k): v for k, v in collections.items()
                               if raw.get("collection", {}).get(k) != json.loads(json.dumps(to_json(v)))}
        if admin != meta["federation"].get("admin_sha256"):
            put[("meta", "federation")] = self._identity(admin)
        if changed or put:
            self._commit(put, bump=changed)
        for key, record in self.collections.items():
            self._merged[key] = MergedFactors(self.space.layout, self.dtype)
            for m in record.members:
                self._merged[key].add(arts[m])
                self._arts[m] = arts[m]
