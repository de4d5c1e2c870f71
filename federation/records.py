"""The registry's records as they are stored (one JSON value per (kind, key) row of the state store),
and the translation of a pre-SQLite manifest.json into them.

Kinds: "meta" (the federation's identity and version), "person", "client", "reservation",
"concept", "collection", "request" (an answered mutation, kept for retries) and "file" (an
artifact file being written or deleted, see `federation.store`). Concepts, reservations and
collections are keyed by their name's lower case: names are unique case-insensitively.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from federation.auth import PERSON_NAME_RE, name_key
from federation.errors import FederationError

FORMAT = "blocklora-federation"
FORMAT_VERSION = 2  # 1: manifest.json, migrated on first start (`from_manifest`)
REQUEST_TTL_S = 3600.0  # how long an answered mutation is kept for a retry of it (Ray's, or a client's)
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
DEFAULT = "default"  # the collection every new concept joins while its slot there is free


@dataclass(frozen=True)
class Reservation:
    name: str  # as the client spelled it
    client: str
    slot: int
    class_word: str
    expires_at: float  # wall-clock seconds, so expiry survives a coordinator restart
    id: str  # kept across renewals: names the client's training run, so only a retry of it resumes
    reserved_at: float = 0.0  # wall-clock seconds of the first reservation; 0 in records from before it


@dataclass(frozen=True)
class ConceptRecord:
    name: str
    client: str  # its owner: a client id, or "admin"
    slot: int
    class_word: str
    triggers: tuple[str, ...]
    file: str
    sha256: str
    version: int  # the federation version at which it went live
    live_at: float = 0.0  # wall-clock seconds it went live; 0 in records from before it


@dataclass(frozen=True)
class CollectionRecord:
    name: str
    owner: str  # a client id, or "admin"
    members: tuple[str, ...]  # concept keys, in the order they joined
    version: int


@dataclass(frozen=True)
class Answered:
    """A committed mutation's answer, replayed to a retry with the same request id."""

    principal: str
    method: str
    answer: dict[str, Any]
    at: float


def to_json(record: Any) -> Any:
    return dataclasses.asdict(record) if dataclasses.is_dataclass(record) else record


def check_request_id(request_id: object) -> str:
    if type(request_id) is not str or not REQUEST_ID_RE.fullmatch(request_id):
        raise FederationError(f"request id {ascii(request_id)[:60]} is not 8-64 ASCII letters, digits, '-' or '_'; "
                              "draw one per call (uuid4().hex) and send the same one when retrying it")
    return request_id


def from_manifest(m: Any, default_quota: int) -> dict[tuple[str, str], Any]:
    """The records of a format-1 manifest.json. Each old client becomes a person of its own (its
    name kept where the person-name rule allows it and it is not taken, else its client id) with
    an invitation that is already used up; everything else keeps its fields. Nothing is checked
    here: the records are loaded like any others, one by one (federation/manifest.py)."""
    if type(m) is not dict or m.get("format") != FORMAT or m.get("format_version") != 1:
        raise RuntimeError(f"manifest.json is not a {FORMAT} v1 manifest; restore it from a backup or start a new "
                           "state folder")
    out: dict[tuple[str, str], Any] = {("meta", "federation"): {
        "format": FORMAT, "format_version": FORMAT_VERSION, "base_spec": m.get("base_spec"),
        "base_fingerprint": m.get("base_fingerprint"), "adapter": m.get("adapter"),
        "admin_sha256": m.get("admin_sha256")},
        ("meta", "state"): {"version": m.get("version"), "digest": ""}}
    taken: set[str] = {"admin"}
    for cid, client in (m.get("clients") or {}).items():
        name = client.get("name") if type(client) is dict else None
        if type(name) is not str or not PERSON_NAME_RE.fullmatch(name) or name_key(name) in taken:
            name = cid
        taken.add(name_key(name))
        pid = "p" + cid[1:]
        out[("person", pid)] = {"name": name, "quota": default_quota, "invitation_sha256": "0" * 64,
                                "uses_left": 0, "expires_at": 0.0}
        digest = client.get("token_sha256") if type(client) is dict else None
        out[("client", cid)] = {"person": pid, "token_sha256": digest}
    for kind in ("reservation", "concept"):
        for name, record in (m.get(kind + "s") or {}).items():
            key = name_key(name) if type(name) is str else name
            if (kind, key) in out:  # the same name in another case: kept under its own, and refused at load
                key = name
            out[(kind, key)] = {"name": name, **record} if type(record) is dict else record
    return out
