"""Faults survived with nothing lost, on real Ray: a whole local cluster restarted on the same state
folder, the coordinator's process SIGKILLed in the middle of uploads and removals, a generator
replica SIGKILLed under HTTP traffic, and a Ray Train worker SIGKILLed in the middle of training.

After every fault: each concept is fully live or fully absent, the merged residual is exactly the sum
of the live concepts' dW, the state folder holds no tmp or orphan file, tokens still work, and HTTP
answers are the right image or a clean 5xx.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import os
import signal
import sqlite3
import threading
import time
import uuid

import numpy as np
import pytest
import ray
import torch
from PIL import Image
from ray.util.state import list_actors

from blocklora.config import AdapterConfig, FederationConfig, TrainConfig
from blocklora.files.safefile import write_safetensors
from blocklora.method.artifact import ConceptArtifact
from blocklora.method.slots import SlotSpace
from blocklora.pipeline.base import load_base
from conftest import REPO
from core_helpers import enrol, make_artifact
from devtools.local_cluster import LocalCluster
from federation import coordinator
from federation.auth import token_hash
from federation.client import train_artifact
from federation.errors import FederationError
from federation.protocol import ConceptQuery, Grant
from federation.registry import Registry
from federation.store import StateStore
from serve_helpers import draw, is_generator, pixels, start_in_process, stop_app, wait_until

pytestmark = pytest.mark.slow

NAMESPACE, NAME = "blocklora-faults", "coordinator-faults"
ADAPTER = AdapterConfig(rank=2, num_slots=4)
ADMIN = "faults-admin-token"
SAMPLING = {"steps": 2, "guidance_scale": 4.0, "seed": 5}


def observable(actor) -> tuple:
    return tuple(ray.get([actor.version.remote(), actor.list_concepts.remote(), actor.info.remote()]))


def submit_new(actor, base, token: str, name: str, seed: int) -> ConceptArtifact:
    slot = ray.get(actor.reserve.remote(token, name, "dog")).slot
    art = make_artifact(base, ADAPTER, name, slot, seed=seed)
    ray.get(actor.submit.remote(token, art.to_bytes()))
    return art


def stored(state_dir) -> dict[str, dict]:
    """The records in the state folder's database, read as an operator would (sqlite3, read-only)."""
    db = sqlite3.connect(f"file:{state_dir / 'federation.db'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT kind, key, value FROM records").fetchall()
    finally:
        db.close()
    out: dict[str, dict] = {}
    for kind, key, value in rows:
        out.setdefault(kind, {})[key] = json.loads(value)
    return out


def assert_consistent(actor, state_dir, arts: dict[str, ConceptArtifact]) -> set[str]:
    """Every live concept is whole (its exact bytes, its file, its rows of the default collection's
    residual), nothing else is there; returns the live names."""
    version, page = ray.get([actor.version.remote(), actor.list_concepts.remote(ConceptQuery(status="live"))])
    live = {c.name for c in page.items}
    for c in page.items:
        assert c.sha256 == hashlib.sha256(arts[c.name].to_bytes()).hexdigest(), c.name
        assert ray.get(actor.artifact.remote(c.name, c.sha256)) == arts[c.name].to_bytes()
    default = ray.get(actor.collection.remote("default")).members
    residual = ray.get(actor.merged_residual.remote())
    for key, value in residual.items():
        expected = torch.zeros_like(value)
        for name in default:
            expected += arts[name].delta(key)
        assert torch.equal(value, expected), key
    records = stored(state_dir)
    assert set(records["concept"]) == live and records["meta"]["state"]["version"] == version
    assert not records.get("file"), records.get("file")  # no write or delete left half done
    files = sorted(p.name for p in state_dir.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith(".tmp")], files
    assert sorted(p.name for p in (state_dir / "concepts").iterdir()) == sorted(
        c["file"] for c in records["concept"].values())
    return live


# -- a whole cluster restarted on the same state folder -------------------------------------------
def test_cluster_restart_keeps_concepts_and_tokens(tmp_path):
    """Runs first: it owns its ray connection to a private LocalCluster, started twice."""
    state_dir, base = tmp_path / "state", load_base("tiny")

    def up() -> tuple[LocalCluster, ray.actor.ActorHandle]:
        cluster = LocalCluster(num_cpus=1, cwd=REPO).start()
        coordinator.connect(cluster.address, NAMESPACE)  # in-process: the script is tested elsewhere
        fresh = not (state_dir / "federation.db").exists()
        return cluster, coordinator.start(state_dir, ADAPTER, FederationConfig(), token_hash(ADMIN) if fresh else None,
                                          NAME, NAMESPACE)

    cluster, actor = up()
    try:
        tokens = {n: enrol(actor, ADMIN, f"owner-{n}", remote=True) for n in ("a", "b")}
        arts = {n: submit_new(actor, base, tokens[n], n, seed=i) for i, n in enumerate(tokens)}
        before, residual = observable(actor), ray.get(actor.merged_residual.remote())
    finally:
        ray.shutdown()
        cluster.stop()
    cluster, actor = up()
    try:
        assert observable(actor) == before
        after = ray.get(actor.merged_residual.remote())
        assert all(torch.equal(after[k], v) for k, v in residual.items())
        for n, tok in tokens.items():
            assert ray.get(actor.whoami.remote(tok)).name == f"owner-{n}"
        assert ray.get(actor.whoami.remote(ADMIN)).admin
        assert ray.get(actor.remove.remote(tokens["a"], "a")).removed == "concept"
        assert assert_consistent(actor, state_dir, arts) == {"b"}
    finally:
        ray.shutdown()
        cluster.stop()


# -- a state folder with bad records: quarantined, never a dead coordinator ------------------------
def test_bad_records_are_quarantined_not_fatal(tmp_path):
    """Issue #16: an artifact with `adapter.num_slots: 4.0` once went live, and every later start on
    that folder died with TypeError. Now each record is checked on its own at start-up; a bad one is
    moved aside with its reason and the federation starts with the rest."""
    base, state_dir = load_base("tiny"), tmp_path / "state"
    reg = Registry(SlotSpace.of(base, ADAPTER), FederationConfig(), StateStore(state_dir), token_hash(ADMIN))
    alice = enrol(reg, ADMIN, "alice")
    arts = {}
    for i, name in enumerate(("keep", "float-slots", "gone", "typo")):
        arts[name] = make_artifact(base, ADAPTER, name, reg.reserve(alice, name, "dog").slot, seed=i)
        reg.submit(alice, arts[name].to_bytes())
    reg.remove(alice, "typo")
    reg.reserve(alice, "held", "cat")
    records = reg.store.load()
    reg.close()
    # what an older loader let through: the same concept, its metadata's slot count a float
    meta = json.loads(arts["float-slots"].meta.to_json())
    meta["adapter"]["num_slots"] = float(ADAPTER.num_slots)
    forged = write_safetensors(arts["float-slots"].tensors, {"blocklora": json.dumps(meta)})
    record = records["concept"]["float-slots"]
    (state_dir / "concepts" / record["file"]).write_bytes(forged)
    (state_dir / "concepts" / records["concept"]["gone"]["file"]).unlink()  # a file lost by hand
    edits = {("concept", "float-slots"): {**record, "sha256": hashlib.sha256(forged).hexdigest()},
             ("reservation", "held"): {**records["reservation"]["held"], "slot": True},  # a bool where an int belongs
             ("client", "c" + "0" * 16): {"person": "p" + "0" * 16, "token_sha256": 5},
             ("concept", "pet\n"): {**records["concept"]["keep"], "name": "pet\n"}}  # a name only `$` would accept
    db = sqlite3.connect(state_dir / "federation.db")  # by hand, as an operator might
    with db:
        db.executemany("INSERT OR REPLACE INTO records VALUES (?, ?, ?)",
                       [(kind, key, json.dumps(value)) for (kind, key), value in edits.items()])
    db.close()

    back = Registry(SlotSpace.of(base, ADAPTER), FederationConfig(), StateStore(state_dir))
    reasons = {q.name: q.reason for q in back.quarantined if q.kind != "collection member"}
    assert set(reasons) == {"'float-slots'", "'gone'", "'held'", "'c0000000000000000'", "'pet\\n'"}, reasons
    assert "num_slots must be an integer" in reasons["'float-slots'"] and "missing" in reasons["'gone'"]
    assert "slot must be an integer" in reasons["'held'"] and "printable" in reasons["'pet\\n'"]
    assert [c.name for c in back.list_concepts().items] == ["keep"]
    residual = back.merged_residual()
    assert all(torch.equal(v, arts["keep"].delta(k)) for k, v in residual.items())
    assert back.info().quarantined == tuple(back.quarantined)
    folder = next((state_dir / "quarantine").iterdir())
    kept = {(r["kind"], r["key"]): r["value"] for r in json.loads((folder / "records.json").read_text())}
    assert kept[("concept", "float-slots")] == edits[("concept", "float-slots")]  # the records as they were
    assert (folder / record["file"]).read_bytes() == forged
    assert len(json.loads((folder / "reasons.json").read_text())) == 5
    assert sorted(p.name for p in (state_dir / "concepts").iterdir()) == [records["concept"]["keep"]["file"]]
    # the federation works on: alice's token, a new reservation; a restart is clean
    assert back.reserve(alice, "again", "dog").slot != arts["keep"].meta.slot
    back.close()
    assert Registry(SlotSpace.of(base, ADAPTER), FederationConfig(), StateStore(state_dir)).quarantined == []


# -- the session cluster: coordinator and replica crashes ----------------------------------------
@pytest.fixture(scope="module")
def fed(ray_head, serve_port, tmp_path_factory):
    """The coordinator and the Serve app on the session cluster; `http` talks to the app."""
    root = tmp_path_factory.mktemp("faults")
    actor, http = start_in_process(ray_head, root / "state", NAMESPACE, NAME, ADAPTER, ADMIN, serve_port)
    token = enrol(actor, ADMIN, "faults", quota=100, remote=True)
    yield dataclasses.make_dataclass("Fed", ["head", "state_dir", "actor", "token", "base", "arts", "http"])(
        ray_head, root / "state", actor, token, load_base("tiny"), {}, http)
    http.close()
    stop_app(actor)
    ray.shutdown()


def alive_pids(head, match) -> set[int]:
    rows = list_actors(address=head.dashboard_url, filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    return {a.pid for a in rows if match(a)}


def outcome(ref) -> str:
    """What the caller of a call interrupted by the crash saw: a result or a clean error."""
    try:
        ray.get(ref, timeout=180)
        return "ok"
    except FederationError as err:
        return type(err).__name__
    except ray.exceptions.RayActorError:
        return "actor-died"


def test_coordinator_killed_mid_upload_and_removal(fed):
    actor, tok = fed.actor, fed.token
    for i, n in enumerate(("keep", "victim0")):
        fed.arts[n] = submit_new(actor, fed.base, tok, n, seed=10 + i)
    seen = []
    for rnd, delay in enumerate((0.0, 0.05, 0.3)):  # kill before, during and after the calls land
        name, victim = f"up{rnd}", f"up{rnd - 1}" if rnd else "victim0"  # remove the last round's upload
        slot = ray.get(actor.reserve.remote(tok, name, "dog")).slot
        fed.arts[name] = art = make_artifact(fed.base, ADAPTER, name, slot, seed=20 + rnd)
        data = art.to_bytes()
        pid = next(iter(alive_pids(fed.head, lambda a: a.name == NAME)))
        members = ("keep",) if rnd % 2 == 0 else ()
        # as the ingress and the client send them: each with a request id, which Ray's retry repeats
        refs = [actor.submit.remote(tok, data, uuid.uuid4().hex), actor.remove.remote(tok, victim, uuid.uuid4().hex),
                actor.put_collection.remote(tok, "picked", members, uuid.uuid4().hex)]
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: [ray.get(actor.version.remote(), timeout=10)], 180, "coordinator back")
        assert pid not in alive_pids(fed.head, lambda a: a.name == NAME)
        seen.append([outcome(r) for r in refs])
        # a call that committed and was retried on the restarted actor gets its first answer, never a
        # refusal of its own effect (the DELETE that answered 404, issue #40)
        assert set(seen[-1]) <= {"ok", "actor-died"}, seen
        live = assert_consistent(actor, fed.state_dir, fed.arts)
        assert {"keep"} <= live <= {"keep", name, victim}
        # converge: a retried upload is idempotent (or completes it); a retried removal finishes it
        assert ray.get(actor.submit.remote(tok, data)).slot == slot
        if victim in live:
            ray.get(actor.remove.remote(tok, victim))
        ray.get(actor.put_collection.remote(tok, "picked", members))
        assert assert_consistent(actor, fed.state_dir, fed.arts) == {"keep", name}
        picked = ray.get(actor.merged_residual.remote("picked"))
        assert all(torch.equal(v, sum((fed.arts[n].delta(k) for n in members), torch.zeros_like(v)))
                   for k, v in picked.items())
    print("outcomes of the interrupted (submit, remove, collection edit) calls:", seen)


def test_generator_replica_killed_under_traffic(fed):
    app = fed.http
    live = {c["name"] for c in app.get("/v1/concepts").json()["concepts"]}
    for i, name in enumerate(("steady0", "steady1")[:max(0, 2 - len(live))]):  # run alone: nothing live yet
        fed.arts[name] = submit_new(fed.actor, fed.base, fed.token, name, seed=30 + i)
    version = app.get("/v1/concepts").json()["version"]
    names = sorted(c["name"] for c in app.get("/v1/concepts").json()["concepts"])[:2]
    bodies = [{"prompt": "a photo of a dog"}, {"prompt": f"a photo of {{{names[0]}}}"},
              {"prompt": " and ".join(f"{{{n}}}" for n in names)}]
    expected = draw(app, [{**SAMPLING, **body} for body in bodies], version)
    old = alive_pids(fed.head, is_generator)
    assert len(old) == 1
    stop, results = threading.Event(), []

    def traffic(k: int) -> None:
        for i in itertools.count(k, 2):
            if stop.is_set():
                return
            r = app.post("/v1/generate", json={**SAMPLING, **bodies[i % 3]})
            results.append((i % 3, r.status_code, r.content, r.headers.get("x-blocklora-version"), time.monotonic()))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        clients = [pool.submit(traffic, k) for k in range(2)]
        try:
            wait_until(lambda: len(results) >= 2, 60, "traffic flowing")
            os.kill(next(iter(old)), signal.SIGKILL)
            new = wait_until(lambda: alive_pids(fed.head, is_generator) - old, 180, "a new replica")
            health = wait_until(lambda: app.get("/v1/healthz", timeout=30).json(), 180, "healthz")
            assert health["version"] == version
            recovered = time.monotonic()
            wait_until(lambda: sum(1 for r in results if r[1] == 200 and r[4] > recovered) >= 3, 120,
                       "three answers from the new replica")
        finally:
            stop.set()
            for c in clients:
                c.result(timeout=180)
    assert len(new) == 1
    statuses = [r[1] for r in results]
    assert all(s == 200 or 500 <= s < 600 for s in statuses), statuses
    for i, status, content, ver, _ in results:
        if status == 200:
            assert int(ver) == version
            assert np.abs(pixels(content) - expected[i]).max() <= 2, (bodies[i], "a wrong image")
    print(f"replica kill: {len(results)} requests, statuses {sorted(set(statuses))}, "
          f"{sum(s != 200 for s in statuses)} clean 5xx")


def test_training_worker_killed_resumes_from_its_checkpoint(fed, tmp_path):
    """Ray Train restarts the worker from the run's latest checkpoint (FailureConfig), and the
    artifact is the one an uninterrupted run produces: the checkpoint carries every RNG state."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), (60 * i, 90, 200 - 50 * i), np.uint8)).save(images / f"{i}.png")
    grant = Grant(name="resumed", slot=3, class_word="dog", triggers=("<blk3>",), adapter=ADAPTER, base_spec="tiny",
                  base_fingerprint=fed.base.fingerprint, resolution=32, expires_at=0.0, reservation_id="straight")
    train = TrainConfig(steps=24, batch_size=1, resolution=32, checkpoint_every=4, seed=4)

    run = tmp_path / "runs" / "resumed-slot3-killed"
    is_worker = lambda a: "TrainWorker" in (a.class_name or "")  # noqa: E731
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        job = pool.submit(train_artifact, dataclasses.replace(grant, reservation_id="killed"), images, train, 1,
                          False, tmp_path / "runs")
        wait_until(lambda: any(run.glob("checkpoint_*")), 180, "the first checkpoint")
        victims = alive_pids(fed.head, is_worker)
        assert len(victims) == 1 and not job.done()
        os.kill(victims.pop(), signal.SIGKILL)
        # the uninterrupted run of the same reservation's settings, alongside the restart (its own run folder)
        straight = pool.submit(train_artifact, grant, images, train, storage_path=tmp_path / "runs")
        resumed, reference = job.result(timeout=600), straight.result(timeout=600)
    assert ConceptArtifact.from_bytes(resumed).tensors.keys() == ConceptArtifact.from_bytes(reference).tensors.keys()
    for key, value in ConceptArtifact.from_bytes(reference).tensors.items():
        torch.testing.assert_close(ConceptArtifact.from_bytes(resumed).tensors[key], value, rtol=0, atol=1e-6)
