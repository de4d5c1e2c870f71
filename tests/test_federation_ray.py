"""The federation end to end on a real Ray cluster: the coordinator started by jobs/start_coordinator.py,
two concurrent `ray job submit` client trainings, exact residual, removal, rejections, and state
surviving an actor restart and a brand-new coordinator on the same folder.

The tests of this module run in order and share one federation (one cluster for the session).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
import subprocess
import sys
import time

import pytest
import ray
import torch

from blocklora.config import AdapterConfig
from blocklora.method.artifact import ConceptArtifact
from blocklora.pipeline.base import load_base
from conftest import REPO
from core_helpers import enrol, make_artifact
from federation import coordinator
from federation.client import load_or_register
from federation.errors import ArtifactRejected, ReservationError, SlotUnavailable, Unauthorized
from federation.protocol import ConceptQuery
from serve_helpers import invite, start_coordinator as start_script, submit_client

pytestmark = pytest.mark.slow

NAMESPACE, NAME = "blocklora-test", "coordinator-test"
SLOTS, RANK = 3, 2
ADMIN_TOKEN = "test-admin-token"


def start_coordinator(head, state_dir) -> ray.actor.ActorHandle:
    return start_script(head, state_dir, NAMESPACE, NAME, AdapterConfig(rank=RANK, num_slots=SLOTS),
                        ADMIN_TOKEN)


@pytest.fixture(scope="module")
def fed(ray_head, tmp_path_factory):
    """The shared federation: cluster, coordinator, a driver connection, the tiny base, a scratch dir."""
    root = tmp_path_factory.mktemp("federation")
    ray.init(address=ray_head.address, namespace=NAMESPACE, log_to_driver=False)
    actor = start_coordinator(ray_head, root / "state")
    yield dataclasses.make_dataclass("Fed", ["head", "root", "actor", "base", "clients"])(
        ray_head, root, actor, load_base("tiny"), {})
    ray.kill(coordinator.get(NAME, NAMESPACE), no_restart=True)
    ray.shutdown()


def submit_job(fed, name: str, seed: int, workers: int, *flags: str) -> subprocess.Popen:
    return submit_client(fed.head, fed.root, name, seed, NAMESPACE, NAME, ("--steps", "3", *flags), workers,
                         invitation=invite(fed.actor, ADMIN_TOKEN, f"owner-{name}"))


def live_concepts(actor) -> list:
    return list(ray.get(actor.list_concepts.remote(ConceptQuery(status="live"))).items)


def live_artifacts(actor) -> dict[str, ConceptArtifact]:
    """What a serve replica fetches: each live artifact, by name and digest, through the object store."""
    return {c.name: ConceptArtifact.from_bytes(ray.get(actor.artifact.remote(c.name, c.sha256)))
            for c in live_concepts(actor)}


def assert_residual_is_sum(actor) -> None:
    """The default collection's merged residual (every live concept while they hold distinct slots)."""
    arts = list(live_artifacts(actor).values())
    residual = ray.get(actor.merged_residual.remote())
    for key, value in residual.items():
        expected = torch.zeros_like(value)
        for art in arts:
            expected += art.delta(key)
        assert torch.equal(value, expected), key


def observable(actor) -> tuple:
    return ray.get([actor.version.remote(), actor.list_concepts.remote(), actor.info.remote()])


def watch_progress(actor, jobs, reported: dict[str, set[tuple[int, int]]]) -> None:
    """Poll the listing until every job has exited, noting each held slot's reported (step, steps)."""
    while any(job.poll() is None for job in jobs):
        for held in ray.get(actor.list_concepts.remote()).items:
            if held.status == "reserved" and held.progress is not None:
                reported.setdefault(held.name, set()).add((held.progress.step, held.progress.steps))
        time.sleep(0.1)


def test_two_concurrent_client_jobs(fed):
    # dog-b trains data-parallel on 2 workers (gradients all-reduced) in bf16 mixed precision (each worker
    # loads the base in bf16), beside dog-a's one worker in float32 with the quiet penalty over one more class
    quiet = ("--quiet-weight", "0.1", "--quiet-classes", "cat", "--num-class-images", "1")
    jobs = {name: submit_job(fed, name, seed, workers, *flags) for name, seed, workers, flags in
            (("dog-a", 1, 1, quiet), ("dog-b", 2, 2, ("--mixed-precision", "bf16")))}
    reported: dict[str, set[tuple[int, int]]] = {}  # what listings showed of each job's step reports
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        watching = pool.submit(watch_progress, fed.actor, jobs.values(), reported)
        outs = {name: job.communicate(timeout=540)[0] for name, job in jobs.items()}
        watching.result()
    # rank 0 reports at its first step and its last (3 steps are far shorter than the report interval)
    assert all(seen <= {(1, 3), (3, 3)} for seen in reported.values()) and reported, reported
    for name, job in jobs.items():
        out = outs[name]
        assert job.returncode == 0, out[-4000:]
        assert f"concept '{name}' is live in slot" in out, out[-4000:]
        # the wait before the first step is announced, not silent (each line behind Ray's worker prefix);
        # the pictures are drawn, or read from the node's cache where an earlier test drew the same set
        said = "\n".join(ln.split(f"[{name}] ", 1)[1] for ln in out.splitlines() if f"[{name}] " in ln)
        announced = (r"\Aclass pictures for the quiet penalty: 1 base picture each of 2 classes \(dog, cat\)\n"
                     r"(drawing 1 base picture of 'a photo of (dog|cat)'\n)*"
                     r"class pictures ready in \d+\.\d s: \d drawn here, \d read from this node's cache\n"
                     r"quiet penalty's bank recorded over 2 classes in \d+\.\d s\nstep 1/3")
        assert bool(re.search(announced, said)) == (name == "dog-a"), said
        # what the person who submitted it sees: the step progress of rank 0, not Ray's own lines
        assert re.search(rf"\[{name}\] step 3/3  loss \d+\.\d{{4}}  \d+\.\d\d steps/s  ETA 0 s", out), out[-4000:]
        noise = "Reporting training result|execution finished|DeprecationWarning|actor restart"
        assert not re.search(noise, out), out[-4000:]
        fed.clients[name] = (fed.root / f"{name}.token").read_text().strip()
    concepts = live_concepts(fed.actor)
    assert [c.status for c in concepts] == ["live", "live"]
    assert len({c.slot for c in concepts}) == 2 and {c.owner for c in concepts} == {"owner-dog-a", "owner-dog-b"}
    assert ray.get(fed.actor.version.remote()) == 2
    arts = live_artifacts(fed.actor)
    assert all(a.meta.train_config["steps_done"] == 3 for a in arts.values())
    assert {n: a.meta.train_config["mixed_precision"] for n, a in arts.items()} == {"dog-a": "no", "dog-b": "bf16"}
    assert all(v.dtype == torch.float32 for a in arts.values() for v in a.tensors.values())  # fp32 on the wire
    assert_residual_is_sum(fed.actor)


def test_rejections_change_nothing(fed):
    actor, base, token = fed.actor, fed.base, fed.clients["dog-b"]
    adapter = ray.get(actor.info.remote()).adapter
    other = enrol(actor, ADMIN_TOKEN, "other", remote=True)
    grant = ray.get(actor.reserve.remote(token, "bad", "dog"))
    good = make_artifact(base, adapter, "bad", grant.slot, seed=9)
    before = observable(actor)
    nan = make_artifact(base, adapter, "bad", grant.slot, seed=9)
    nan.tensors[next(k for k in nan.tensors if k.endswith("lora_A"))][0, 0] = float("inf")
    foreign = dataclasses.replace(good, meta=dataclasses.replace(good.meta, base_fingerprint="f" * 64))
    shapes = make_artifact(base, dataclasses.replace(adapter, rank=RANK + 1), "bad", grant.slot)
    cases = [
        (Unauthorized, "not recognised", "c0.wrong", good.to_bytes()),
        (ReservationError, "another client", other, good.to_bytes()),
        (ArtifactRejected, "trained on base", token, foreign.to_bytes()),
        (ArtifactRejected, "adapter", token, shapes.to_bytes()),
        (ArtifactRejected, "NaN or Inf", token, nan.to_bytes()),
        (ArtifactRejected, "truncated|runs past|trailing", token, good.to_bytes()[:-64]),
        (ArtifactRejected, "accepts at most", token, good.to_bytes() + b"\0" * (64 * 1024 * 1024)),
    ]
    for error, message, who, data in cases:
        with pytest.raises(error, match=message):
            ray.get(actor.submit.remote(who, data))
    with pytest.raises(SlotUnavailable, match="'dog-a' is already live"):
        ray.get(actor.reserve.remote(other, "DOG-A", "cat"))  # names are unique regardless of case
    assert observable(actor) == before
    ray.get(actor.remove.remote(token, "bad"))  # cancel the reservation: its slot is free again


def test_remove_updates_residual_and_frees_slot(fed):
    actor = fed.actor
    slot_a = next(c.slot for c in live_concepts(actor) if c.name == "dog-a")
    with pytest.raises(Unauthorized, match="another person"):
        ray.get(actor.remove.remote(fed.clients["dog-b"], "dog-a"))
    done = ray.get(actor.remove.remote(fed.clients["dog-a"], "dog-a"))
    assert done.version == 3 and done.slot == slot_a
    assert set(live_artifacts(actor)) == {"dog-b"}
    assert_residual_is_sum(actor)
    grant = ray.get(actor.reserve.remote(fed.clients["dog-a"], "dog-a2", "dog"))
    assert grant.slot == slot_a
    art = make_artifact(fed.base, grant.adapter, "dog-a2", slot_a, seed=4)
    assert ray.get(actor.submit.remote(fed.clients["dog-a"], art.to_bytes())).version == 4
    assert_residual_is_sum(actor)


def wait_until_up(get_actor, timeout: float = 120) -> ray.actor.ActorHandle:
    """Poll (bounded) until the coordinator answers again."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            actor = get_actor()
            ray.get(actor.version.remote(), timeout=10)
            return actor
        except (ray.exceptions.RayError, RuntimeError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_restarted_actor_has_everything(fed):
    before = observable(fed.actor)
    residual = ray.get(fed.actor.merged_residual.remote())
    ray.kill(fed.actor, no_restart=False)
    actor = wait_until_up(lambda: coordinator.get(NAME, NAMESPACE))
    assert observable(actor) == before
    after = ray.get(actor.merged_residual.remote())
    assert all(torch.equal(after[k], v) for k, v in residual.items())
    assert_residual_is_sum(actor)
    assert ray.get(actor.whoami.remote(fed.clients["dog-b"])).name == "owner-dog-b"


def test_a_second_coordinator_on_the_folder_is_refused_naming_the_holder(fed):
    """Issue #40.4: a second start_coordinator.py on the same --state-dir was accepted and its first
    write dropped the first one's concepts. The folder's lock refuses it, naming who holds it."""
    before = observable(fed.actor)
    proc = subprocess.run([sys.executable, "jobs/start_coordinator.py", "--base-model", "tiny", "--slots", str(SLOTS),
                           "--rank", str(RANK), "--state-dir", str(fed.root / "state"), "--address", fed.head.address,
                           "--namespace", NAMESPACE, "--name", "other"],
                          cwd=REPO, env=fed.head.env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert f"is in use by coordinator '{NAME}' (namespace '{NAMESPACE}')" in proc.stderr, proc.stderr[-3000:]
    assert observable(coordinator.get(NAME, NAMESPACE)) == before


def test_first_jobs_sharing_a_token_file_register_once(fed, tmp_path):
    """Two first-time client jobs with one --token-file: the second used to crash (FileExistsError).
    They take turns on the file: one registers (the invitation allows one client), both use its token."""
    code = invite(fed.actor, ADMIN_TOKEN, "sharer")
    path = tmp_path / "shared" / "client_token"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        tokens = list(pool.map(lambda _: load_or_register(fed.actor, path, code), range(2)))
    assert tokens[0] == tokens[1] == path.read_text() and path.stat().st_mode & 0o077 == 0
    assert ray.get(fed.actor.whoami.remote(tokens[0])).name == "sharer"


def test_fresh_coordinator_on_same_state_dir(fed):
    actor = coordinator.get(NAME, NAMESPACE)
    before = observable(actor)
    residual = ray.get(actor.merged_residual.remote())
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the name is released once the actor is dead
        try:
            coordinator.get(NAME, NAMESPACE)
            time.sleep(0.5)
        except RuntimeError:
            break
    actor = start_coordinator(fed.head, fed.root / "state")
    assert observable(actor) == before
    after = ray.get(actor.merged_residual.remote())
    assert all(torch.equal(after[k], v) for k, v in residual.items())
    assert ray.get(actor.whoami.remote(fed.clients["dog-a"])).name == "owner-dog-a"
    assert ray.get(actor.whoami.remote(ADMIN_TOKEN)).admin
    assert (fed.root / "state" / "admin_token").stat().st_mode & 0o077 == 0
    ray.get(actor.remove.remote(ADMIN_TOKEN, "dog-b"))
    assert set(live_artifacts(actor)) == {"dog-a2"}
    assert_residual_is_sum(actor)


@ray.remote(num_cpus=0)
class Stand:
    """Any named actor: what `coordinator.get` looks for is the name."""

    def ping(self) -> str:
        return "pong"


def test_a_part_started_beside_the_coordinator_waits_for_its_name(fed):
    """The Serve app's replicas look the coordinator up with a wait (the main job starts the app beside
    jobs/start_coordinator.py, which reads the base before it names the actor): a name that appears
    within the wait is found; one that does not is a clear error once the wait has passed."""
    with pytest.raises(RuntimeError, match="no coordinator named 'late' in Ray namespace .* after waiting 1 s"):
        coordinator.get("late", NAMESPACE, wait_s=1)

    def name_it_soon() -> ray.actor.ActorHandle:
        time.sleep(1.5)
        return Stand.options(name="late", namespace=NAMESPACE).remote()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        named = pool.submit(name_it_soon)
        found = coordinator.get("late", NAMESPACE, wait_s=60)
        assert ray.get(found.ping.remote()) == "pong"
    ray.kill(named.result(), no_restart=True)


def test_a_start_on_a_bad_base_names_it_and_leaves_no_state(fed):
    """jobs/start_coordinator.py with a --base-model that is no base: it fails naming the base, before
    any actor exists, and writes nothing (the generated admin token is kept only once the coordinator runs)."""
    state, missing = fed.root / "never-started", fed.root / "no-such-base"
    proc = subprocess.run([sys.executable, "jobs/start_coordinator.py", "--base-model", str(missing), "--slots",
                           str(SLOTS), "--rank", str(RANK), "--state-dir", str(state), "--address", fed.head.address,
                           "--namespace", NAMESPACE, "--name", "bad-base"],
                          cwd=REPO, env=fed.head.env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0 and str(missing) in proc.stderr
    assert not state.exists()
    with pytest.raises(RuntimeError, match="no coordinator named 'bad-base'"):
        coordinator.get("bad-base", NAMESPACE)
