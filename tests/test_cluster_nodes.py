"""The federation on a cluster shaped like cluster.yaml, on this machine: a head (coordinator, Serve
ingress), two client nodes and two serve nodes, each its own raylet on 127.0.0.1 with its node type's
custom resources (devtools.local_cluster.shaped_like_cluster_yaml).

(a) a client job that asks for `client_node` gets a client node, and its Ray Train workers run there
only; (b) SIGKILL of that node mid-training leaves no partial concept live, the slot stays held
for the client, and the job resubmitted lands on the other client node and resumes from its
checkpoint; (c) SIGKILL of the serve node that hosts the generator: the replica comes back on the
other serve node with the same live set, and draws the same pictures over HTTP.

The tests of this module run in order and share one cluster and federation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import uuid

import numpy as np
import pytest
import ray
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.state import list_actors

from blocklora.config import AdapterConfig
from conftest import REPO, free_port
from devtools.local_cluster import shaped_like_cluster_yaml
from federation import procfs
from federation.protocol import ConceptQuery
from serve_helpers import draw, invite, is_generator, pixels, start_in_process, stop_app, submit_client, wait_until

pytestmark = pytest.mark.slow

NAMESPACE, NAME = "blocklora-nodes", "coordinator-nodes"
ADAPTER = AdapterConfig(rank=2, num_slots=4)
ADMIN = "nodes-admin-token"
SAMPLING = {"steps": 2, "guidance_scale": 4.0, "seed": 11}


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """The cluster (its nodes by name in `cluster.node_ids`), the coordinator, the Serve app (replica on a
    serve node, ingress on the head) and an HTTP client; everything stopped, also when a test fails."""
    root = tmp_path_factory.mktemp("nodes")
    cluster = shaped_like_cluster_yaml({"client_gpu": 2, "serve_gpu": 2}, cwd=REPO)
    try:
        actor, http = start_in_process(cluster, root / "state", NAMESPACE, NAME, ADAPTER, ADMIN, free_port(),
                                       generator_resource="serve_gpu", ingress_resource="head_services")
        try:
            yield dataclasses.make_dataclass("Fed", ["cluster", "root", "actor", "http"])(cluster, root, actor, http)
        finally:
            http.close()
            stop_app(actor)
    finally:
        ray.shutdown()
        cluster.stop(grace_s=5)


def nodes_of(fed, match, state: str | None = None) -> set[str]:
    """Names of the nodes where actors `match` (by their state-API record) run or ran."""
    filters = [("state", "=", state)] if state else []
    rows = list_actors(address=fed.cluster.dashboard_url, filters=filters, detail=True, limit=10_000,
                       raise_on_missing_output=False)
    by_id = {v: k for k, v in fed.cluster.node_ids.items()}
    return {by_id.get(a.node_id, "head") for a in rows if match(a)}


def submit(fed, name: str, seed: int, train: tuple[str, ...] = ("--steps", "3")) -> str:
    """Submit a client job asking for a client node, as cluster.yaml says it should; its submission id."""
    job_id = f"{name}-{uuid.uuid4().hex[:8]}"
    first = not (fed.root / f"{name}.token").exists()  # a resubmitted job reuses the token the first one saved
    cli = submit_client(fed.cluster, fed.root, name, seed, NAMESPACE, NAME, train, submit=(
        "--entrypoint-resources", json.dumps({"client_node": 1}), "--submission-id", job_id, "--no-wait"),
        invitation=invite(fed.actor, ADMIN, f"owner-{name}") if first else None)
    out, _ = cli.communicate(timeout=120)
    assert cli.returncode == 0, out[-3000:]
    return job_id


def finish(fed, job_id: str, timeout: float = 300) -> tuple[JobStatus, str]:
    """Wait (bounded) until the job has ended; its status and its driver's log."""
    jobs = JobSubmissionClient(fed.cluster.dashboard_url)
    status = wait_until(lambda: (s := jobs.get_job_status(job_id)).is_terminal() and s, timeout, f"job {job_id} ended")
    return status, fed.cluster.job_log(job_id)


def live(fed) -> set[str]:
    return {c.name for c in ray.get(fed.actor.list_concepts.remote(ConceptQuery(status="live"))).items}


def test_process_ancestry_from_proc():
    """What kill_node and job_node_id read: a shell's sleeping grandchild is found below this process."""
    shell = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    try:
        found = wait_until(lambda: [p for p in procfs.descendants(os.getpid()) if procfs.argv(p)[:1] == ["sleep"]],
                           10, "the sleep below the shell", every=0.05)
        assert procfs.parent_pid(found[0]) == shell.pid and procfs.parent_pid(shell.pid) == os.getpid()
        assert procfs.parent_pid(2**22 + 1) is None and procfs.argv(2**22 + 1) == []
    finally:
        for pid in procfs.descendants(shell.pid):
            os.kill(pid, signal.SIGKILL)
        shell.kill()
        shell.wait()


def test_client_workers_run_on_its_own_client_node(fed):
    status, out = finish(fed, submit(fed, "pup", 1))
    assert status == JobStatus.SUCCEEDED and "concept 'pup' is live in slot" in out, out[-4000:]
    supervisor = nodes_of(fed, lambda a: a.class_name == "JobSupervisor")
    assert supervisor <= {"client_gpu-0", "client_gpu-1"} and len(supervisor) == 1, supervisor
    node = supervisor.pop()
    assert f"training on node {fed.cluster.node_ids[node][:12]}" in out, out[-4000:]
    workers = [a for a in list_actors(address=fed.cluster.dashboard_url, detail=True, limit=10_000,
                                      raise_on_missing_output=False) if "TrainWorker" in (a.class_name or "")]
    assert workers and {a.node_id for a in workers} == {fed.cluster.node_ids[node]}, workers
    assert live(fed) == {"pup"}


def test_client_node_killed_mid_training_then_resubmitted_resumes(fed):
    train = ("--steps", "60", "--checkpoint-every", "10", "--report-every", "10")
    job_id = submit(fed, "lost", 2, train)
    wait_until(lambda: next((fed.root / "train").glob("lost-slot*/checkpoint_manager_snapshot.json"), None),
               240, "the first checkpoint registered (what a resumed run starts from)", every=0.2)
    nodes = nodes_of(fed, lambda a: "TrainWorker" in (a.class_name or ""), state="ALIVE")
    assert len(nodes) == 1 and nodes <= {"client_gpu-0", "client_gpu-1"}, nodes
    victim = nodes.pop()
    fed.cluster.kill_node(victim)
    concepts = {c.name: c for c in ray.get(fed.actor.list_concepts.remote()).items}
    assert live(fed) == {"pup"} and concepts["lost"].status == "reserved", concepts  # nothing partial; slot held
    held_slot = concepts["lost"].slot

    # the client resubmits at once: the job lands on the other client node and resumes
    status, out = finish(fed, submit(fed, "lost", 2, train))
    assert status == JobStatus.SUCCEEDED and f"concept 'lost' is live in slot {held_slot}" in out, out[-4000:]
    status, lost = finish(fed, job_id, 120)
    assert status == JobStatus.FAILED and "is live" not in lost, lost[-3000:]
    survivor = ({"client_gpu-0", "client_gpu-1"} - {victim}).pop()
    assert f"training on node {fed.cluster.node_ids[survivor][:12]}" in out, out[-4000:]
    assert "] step 60/60 " in out and "] step 1/60 " not in out, out[-4000:]  # resumed, not restarted
    assert live(fed) == {"pup", "lost"}


def test_serve_node_killed_replica_comes_back_with_same_pictures(fed):
    app, version = fed.http, ray.get(fed.actor.version.remote())
    bodies = [{"prompt": "a photo of a dog"}, {"prompt": "a photo of {pup} and {lost}"}]
    before = draw(app, [{**SAMPLING, **body} for body in bodies], version)
    first = nodes_of(fed, is_generator, state="ALIVE")
    assert len(first) == 1 and first <= {"serve_gpu-0", "serve_gpu-1"}, first
    assert nodes_of(fed, lambda a: "Ingress" in (a.class_name or ""), state="ALIVE") == {"head"}
    fed.cluster.kill_node(first.pop())
    moved = wait_until(lambda: nodes_of(fed, is_generator, state="ALIVE") & set(fed.cluster.nodes), 180,
                       "a generator replica on the remaining serve node")
    assert moved == {"serve_gpu-0", "serve_gpu-1"} & set(fed.cluster.nodes), moved
    health = wait_until(lambda: app.get("/v1/healthz", timeout=30).json(), 180, "healthz")
    assert health["version"] == version, health
    assert {c["name"] for c in app.get("/v1/concepts").json()["concepts"]} == {"pup", "lost"}
    for body, expected in zip(bodies, before):
        r = wait_until(lambda: (x := app.post("/v1/generate", json={**SAMPLING, **body})).status_code == 200 and x,
                       120, "a picture from the new replica")
        assert np.abs(pixels(r.content) - expected).max() <= 2, body
    assert not np.array_equal(before[0], before[1])
