"""Security: tokens kept hashed and out of logs, owner/admin rules, the HTTP API's keys, untrusted
uploads refused before anything is allocated or unpickled, and Ray's own job API behind its token.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import pickle
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ray
import torch

from blocklora.config import AdapterConfig, FederationConfig
from blocklora.method.artifact import ConceptArtifact, InvalidArtifact
from blocklora.method.slots import SlotSpace
from blocklora.pipeline.base import load_base
from conftest import REPO
from core_helpers import enrol, make_artifact
from devtools.local_cluster import LocalCluster
from federation.auth import token_hash
from federation.errors import ReservationError, SlotUnavailable, Unauthorized
from federation.registry import Registry
from federation.store import StateStore
from serve_helpers import start_in_process, stop_app

NAMESPACE, NAME = "blocklora-security", "coordinator-security"
ADAPTER = AdapterConfig(rank=2, num_slots=3)
ADMIN = "security-admin-token-" + "x" * 16
API_KEY = "security-api-key-" + "y" * 16


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")


def hostile_payloads() -> dict[str, bytes]:
    """Bytes an attacker might upload as a 'concept'."""
    buf = io.BytesIO()
    torch.save({"lora_A": torch.zeros(2, 2)}, buf)  # a zip of pickles
    header = json.dumps({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    return {
        "pickle": pickle.dumps({"name": "evil", "tensors": [1, 2, 3]}),
        "torch.save": buf.getvalue(),
        "huge declared header": struct.pack("<Q", 2**60) + header + b"\0" * 4,
        "header just over the limit": struct.pack("<Q", 4 * 1024 * 1024 + 1) + header + b"\0" * 4,
        "huge declared tensor": struct.pack("<Q", len(h := json.dumps(
            {"t": {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 4]}}).encode())) + h + b"\0" * 4,
    }


@pytest.mark.parametrize("kind", list(hostile_payloads()))
def test_loader_refuses_pickle_and_huge_sizes_without_allocating(kind):
    data = hostile_payloads()[kind]
    t0 = time.monotonic()
    with pytest.raises(InvalidArtifact, match="header|JSON|offsets|bytes do not hold|too short|limit"):
        ConceptArtifact.from_bytes(data)
    assert time.monotonic() - t0 < 1.0  # refused from the header, nothing of the declared size allocated


def test_no_pickle_on_any_boundary():
    """No module of ours imports pickle or calls torch.load/numpy.load: uploads, artifacts, state and
    checkpoints are safetensors + JSON only."""
    offenders = []
    for path in [p for d in ("blocklora", "federation", "serve", "jobs") for p in (REPO / d).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            if any(n.split(".")[0] in ("pickle", "cloudpickle", "dill", "joblib") for n in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {names}")
            if isinstance(node, ast.Attribute) and node.attr == "load" and isinstance(node.value, ast.Name) \
                    and node.value.id in ("torch", "np", "numpy"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} calls {node.value.id}.load")
    assert not offenders, offenders


def test_tokens_stored_hashed_and_only_owner_or_admin_acts(base, tmp_path):
    reg = Registry(SlotSpace.of(base, ADAPTER), FederationConfig(), StateStore(tmp_path / "state"), token_hash(ADMIN))
    alice, bob = (enrol(reg, ADMIN, n) for n in ("alice", "bob"))
    slot = reg.reserve(alice, "pet", "dog").slot
    art = make_artifact(base, ADAPTER, "pet", slot, seed=1)
    with pytest.raises(ReservationError, match="another client"):
        reg.submit(bob, art.to_bytes())  # bob cannot fill alice's slot
    with pytest.raises(ReservationError, match="another client"):
        reg.submit(ADMIN, art.to_bytes())  # nor can the admin fill a slot a client reserved
    reg.submit(alice, art.to_bytes())
    with pytest.raises(SlotUnavailable, match="already live"):
        reg.reserve(bob, "pet", "cat")  # no replacing by re-reserving the name
    with pytest.raises(Unauthorized, match="only its owner or the admin"):
        reg.remove(bob, "pet")
    assert reg.remove(ADMIN, "pet").removed == "concept"
    reg.close()  # the write-ahead log is checkpointed into the database file
    db = (tmp_path / "state" / "federation.db").read_bytes()
    assert token_hash(alice).encode() in db and token_hash(ADMIN).encode() in db
    assert (tmp_path / "state" / "federation.db").stat().st_mode & 0o077 == 0
    for path in (tmp_path / "state").rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            assert not any(t.encode() in raw for t in (alice, bob, ADMIN)), path


# -- over HTTP, with an API key, on the session cluster ---------------------------------------------
@pytest.fixture(scope="module")
def srv(ray_head, serve_port, base, tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    actor, client = start_in_process(ray_head, root / "state", NAMESPACE, NAME, ADAPTER, ADMIN, serve_port, API_KEY)
    owner, other = (enrol(actor, ADMIN, n, remote=True) for n in ("owner", "other"))
    slot = ray.get(actor.reserve.remote(owner, "pet", "dog")).slot
    pet = make_artifact(base, ADAPTER, "pet", slot, seed=3).to_bytes()
    r = client.post("/v1/concepts", content=pet, headers={"Authorization": f"Bearer {owner}"})
    assert r.status_code == 201, r.text
    yield dataclasses.make_dataclass("Srv", ["client", "actor", "owner", "other", "root", "pet_bytes"])(
        client, actor, owner, other, root, pet)
    client.close()
    stop_app(actor)
    ray.shutdown()


@pytest.mark.slow
def test_http_keys_and_tokens(srv):
    gen = {"prompt": "a photo of {pet}", "steps": 1, "seed": 1}
    bearer = lambda t: {"Authorization": f"Bearer {t}"}  # noqa: E731
    cases = [  # (method, path, headers, body, status, text)
        ("post", "/v1/generate", {}, gen, 401, "Bearer"),
        ("post", "/v1/generate", bearer("wrong-key"), gen, 403, "API key not accepted"),
        ("post", "/v1/generate", {"Authorization": API_KEY}, gen, 401, "Bearer"),
        ("post", "/v1/generate", bearer(API_KEY), gen, 200, ""),
        ("delete", "/v1/concepts/pet", {}, None, 401, "Bearer"),
        ("delete", "/v1/concepts/pet", bearer("c0.forged"), None, 403, "not recognised"),
        ("delete", "/v1/concepts/pet", bearer(API_KEY), None, 403, "not recognised"),  # the API key is no admin
        ("delete", "/v1/concepts/pet", bearer(srv.other), None, 403, "only its owner or the admin"),
        ("post", "/v1/concepts", {}, b"x" * 64, 401, "Bearer"),
        ("post", "/v1/concepts", bearer(ADMIN), b"x" * 64, 422, "artifact refused"),
        ("post", "/v1/concepts", bearer(srv.owner), b"x" * 64, 422, "artifact refused"),
        ("delete", "/v1/concepts/ghost", bearer(ADMIN), None, 404, "no live concept"),
        ("post", "/v1/concepts", bearer(srv.other), srv.pet_bytes, 409, "already live"),  # a live name: no takeover
        ("post", "/v1/concepts", bearer(ADMIN), srv.pet_bytes, 409, "already live"),  # nor by the admin
    ]
    before = srv.client.get("/v1/concepts").json()
    for method, path, headers, body, status, text in cases:
        kw = {"json": body} if isinstance(body, dict) else {"content": body}
        r = srv.client.request(method, path, headers=headers, **kw)
        assert r.status_code == status and text in r.text, (method, path, headers, r.status_code, r.text[:300])
        assert not any(leak in r.text for leak in ("Traceback", "\\u001b", ".py")), r.text[:300]  # no internals
    for kind, data in hostile_payloads().items():
        r = srv.client.post("/v1/concepts", content=data, headers=bearer(srv.owner))
        assert r.status_code == 422 and "artifact refused" in r.text, (kind, r.text)
    r = srv.client.post("/v1/concepts", content=b"\0" * (64 * 1024 * 1024 + 1), headers=bearer(srv.owner))
    assert r.status_code == 413 and "at most" in r.text

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        for _ in range(65):
            yield b"\0" * (1024 * 1024)
    r = srv.client.post("/v1/concepts", content=chunks(), headers=bearer(srv.owner))
    assert r.status_code == 413 and "the most this federation accepts" in r.text
    assert srv.client.get("/v1/concepts").json() == before


@pytest.mark.slow
def test_tokens_never_in_logs_or_state(srv):
    secrets_ = [srv.owner, srv.other, ADMIN, API_KEY]
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    scanned = 0
    for folder in (session / "logs", srv.root / "state"):
        for path in folder.rglob("*"):
            if not path.is_file():
                continue
            raw = path.read_bytes()
            scanned += 1
            assert not any(s.encode() in raw for s in secrets_), f"a raw token in {path}"
    assert scanned > 10


@pytest.mark.slow
def test_ray_job_api_needs_the_cluster_token(tmp_path):
    token_file = tmp_path / "ray_auth_token"
    with LocalCluster(num_cpus=1, auth_token_path=token_file, cwd=REPO) as cluster:
        url = f"{cluster.dashboard_url}/api/jobs/"
        for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 403),
                                ({"Authorization": f"Bearer {token_file.read_text().strip()}"}, 200)):
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
                    got = r.status
            except urllib.error.HTTPError as err:
                got = err.code
            assert got == status, (headers.keys(), got)
