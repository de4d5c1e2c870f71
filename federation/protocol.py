"""What the coordinator, its clients and the serve deployments say to each other: frozen dataclasses
(the refusals are in `federation.errors`). Importable without torch, like the errors: a client's
driver reads these.

Inside the cluster these travel as they are (Ray carries them between actors); they become plain
dicts only at the edges, with `to_dict`: the HTTP replies of `serve/ingress.py` and the config of a
Ray Train job (`federation/client.py`), which must be JSON.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from blocklora.config import AdapterConfig

# In a client's final Ray Train checkpoint, the artifact: the training worker (federation/train_func.py)
# writes it, the client's driver (federation/client.py) uploads it, and nothing else leaves the client.
ARTIFACT_FILE = "artifact.safetensors"


class _Message:
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists, nested configs dicts."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Registration(_Message):
    """A registered client; the client drew its token (federation.auth.new_client_token), the
    federation keeps only its sha256."""

    client_id: str
    token: str
    name: str  # the person's, from the invitation: what listings show as the owner


@dataclass(frozen=True)
class Invitation(_Message):
    """What the admin hands a person: the code registers up to `uses` clients, until `expires_at`."""

    name: str
    code: str
    quota: int  # live concepts + reservations the person's clients may hold together
    uses: int
    expires_at: float


@dataclass(frozen=True)
class Principal(_Message):
    """Who a token authenticates as."""

    client_id: str  # "admin" for the admin token
    name: str
    admin: bool


@dataclass(frozen=True)
class _SlotConcept(_Message):
    """A concept name bound to a slot, whatever stage it is at."""

    name: str
    slot: int
    triggers: tuple[str, ...]  # the slot's tokens; `{name}` in a prompt expands to them + the class word
    class_word: str


@dataclass(frozen=True)
class Grant(_SlotConcept):
    """A reserved slot and everything a client needs to train a concept for it."""

    adapter: AdapterConfig
    base_spec: str
    base_fingerprint: str
    resolution: int  # train at the base's native size
    expires_at: float  # wall-clock seconds; reserve again before then to renew
    reservation_id: str  # kept across renewals: names the training run, so only a retry of it resumes
    slot_peers: int = 0  # other live concepts in this slot: none of them can be merged with this one
    peer_names: tuple[str, ...] = ()  # a few of them, to show


@dataclass(frozen=True)
class LiveConcept(_SlotConcept):
    """A concept the federation serves."""

    owner: str
    version: int  # the federation version at which it went live
    sha256: str  # of the artifact's bytes: a replica sees a re-upload under the same name by it
    live_at: float = 0.0  # wall-clock seconds it went live (0: before the registry recorded it)
    status: ClassVar[str] = "live"


@dataclass(frozen=True)
class TrainingProgress(_Message):
    """Where the client job training for a reservation says it is: a display hint, never a decision."""

    step: int
    steps: int
    eta_s: float | None  # None until the job has timed a step after its first
    at: float  # wall-clock seconds the coordinator received it


@dataclass(frozen=True)
class HeldSlot(_SlotConcept):
    """A reservation, as listings show it: a slot held for a concept still being trained."""

    owner: str
    expires_at: float
    reserved_at: float = 0.0  # wall-clock seconds of the first reservation (0: before it was recorded)
    progress: TrainingProgress | None = None  # the training job's latest report, if it sent one
    status: ClassVar[str] = "reserved"


@dataclass(frozen=True)
class Removed(_Message):
    name: str
    slot: int
    version: int
    removed: Literal["concept", "reservation"]


@dataclass(frozen=True)
class Quarantined:
    """A stored record left out at start-up, and why (federation/manifest.py)."""

    kind: str  # "person" | "client" | "reservation" | "concept" | "collection" | ...
    name: str  # the record's key, ascii-escaped and bounded (it may be the malformed part)
    reason: str


@dataclass(frozen=True)
class FederationInfo(_Message):
    """The federation's shape and occupancy, as anyone may read it."""

    base_spec: str
    base_fingerprint: str
    resolution: int
    adapter: AdapterConfig
    live: int
    reserved: int
    slot_use: tuple[int, ...]  # live concepts + reservations per slot
    collections: int
    people: int
    version: int
    max_artifact_bytes: int
    reservation_ttl_s: float
    max_concepts_per_person: int
    quarantined: tuple[Quarantined, ...]  # records set aside at start-up (federation/manifest.py)
    state_dir: str | None

    @property
    def num_slots(self) -> int:
        return self.adapter.num_slots


STATUSES = ("live", "reserved", "any")


@dataclass(frozen=True)
class ConceptQuery(_Message):
    """One page of the library: concepts (and reservations) in name order, filtered. Every field is
    checked by the registry; a bad one is refused naming it."""

    limit: int = 100  # 1..MAX_PAGE
    cursor: str | None = None  # `next_cursor` of the previous page
    prefix: str | None = None  # of the name, case-insensitive
    owner: str | None = None  # a person's name, case-insensitive
    class_word: str | None = None  # exact
    slot: int | None = None
    collection: str | None = None  # only its members
    status: Literal["live", "reserved", "any"] = "any"


@dataclass(frozen=True)
class ConceptPage(_Message):
    version: int
    total: int  # entries matching the filters, over every page
    items: tuple[LiveConcept | HeldSlot, ...]
    next_cursor: str | None  # None: this was the last page


@dataclass(frozen=True)
class Collection(_Message):
    """A named set of concepts in pairwise different slots, kept merged by the coordinator."""

    name: str
    owner: str
    members: dict[str, int]  # concept name -> its slot
    version: int  # the federation version of its last change


@dataclass(frozen=True)
class Clash(_Message):
    slot: int
    concepts: tuple[str, str]


@dataclass(frozen=True)
class Mergeable(_Message):
    """Whether a set of concepts can be merged into one picture, and if not, why."""

    mergeable: bool
    slots: dict[str, int]  # each known concept's slot
    clashes: tuple[Clash, ...]  # pairs in one slot
    unknown: tuple[str, ...]  # names that are not live


@dataclass(frozen=True)
class Resolved(_Message):
    """A live concept as one request uses it: the exact artifact (sha256) and its weight."""

    name: str
    slot: int
    sha256: str
    phrase: str  # what `{name}` expands to: the slot's trigger tokens and the class word
    weight: float


@dataclass(frozen=True)
class Plan(_Message):
    """What one generate request merges, checked by the coordinator at `version`: pairwise different
    slots, every concept live. A replica draws exactly these artifacts (by sha256)."""

    version: int
    concepts: tuple[Resolved, ...]
