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
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from blocklora.config import AdapterConfig

if TYPE_CHECKING:
    from federation.manifest import Quarantined

# In a client's final Ray Train checkpoint, the artifact: the training worker (federation/train_func.py)
# writes it, the client's driver (federation/client.py) uploads it, and nothing else leaves the client.
ARTIFACT_FILE = "artifact.safetensors"


class _Message:
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists, nested configs dicts."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Registration(_Message):
    """A new client. The token is shown this once; the federation keeps only its sha256."""

    client_id: str
    token: str


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


@dataclass(frozen=True)
class LiveConcept(_SlotConcept):
    """A concept the federation serves."""

    owner: str
    version: int  # the federation version at which it went live
    sha256: str  # of the artifact's bytes: a replica sees a re-upload under the same name by it
    status: ClassVar[str] = "live"


@dataclass(frozen=True)
class HeldSlot(_SlotConcept):
    """A reservation, as listings show it: a slot held for a concept still being trained."""

    owner: str
    expires_at: float
    status: ClassVar[str] = "reserved"


@dataclass(frozen=True)
class Removed(_Message):
    name: str
    slot: int
    version: int
    removed: Literal["concept", "reservation"]


@dataclass(frozen=True)
class FederationInfo(_Message):
    """The federation's shape and occupancy, as anyone may read it."""

    base_spec: str
    base_fingerprint: str
    resolution: int
    adapter: AdapterConfig
    free_slots: int
    live: int
    reserved: int
    version: int
    max_artifact_bytes: int
    reservation_ttl_s: float
    max_slots_per_client: int
    quarantined: tuple[Quarantined, ...]  # manifest records set aside at start-up (federation/manifest.py)
    state_dir: str | None

    @property
    def num_slots(self) -> int:
        return self.adapter.num_slots


@dataclass(frozen=True)
class LiveSet:
    """The live concepts at one federation version, as a serve replica follows them."""

    version: int
    changed: bool  # version differs from the one the caller said it has
    concepts: dict[str, LiveConcept]
    artifacts: dict[str, Any]  # name -> Ray ObjectRef of the artifact's bytes (one put per artifact, cached)
