"""Two generator replicas behind one ingress: each follows the coordinator on its own, and a request
draws the same picture whichever replica serves it."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import ray
from ray import serve

from blocklora.config import AdapterConfig
from blocklora.pipeline.base import load_base
from core_helpers import enrol, make_artifact
from serve_helpers import pixels, start_in_process, stop_app

pytestmark = pytest.mark.slow

NAMESPACE, NAME = "blocklora-replicas-test", "coordinator-replicas-test"
ADAPTER = AdapterConfig(rank=2, num_slots=3)
ADMIN = "replicas-test-admin-token"
SAMPLING = {"steps": 3, "guidance_scale": 4.0, "seed": 5}


def replica_states(rounds: int = 40) -> dict[str, dict]:
    """Ask the generator deployment `rounds` times (requests spread over replicas); replica id -> state."""
    handle = serve.get_deployment_handle("Generator", app_name="blocklora")
    states = [handle.status.remote().result(timeout_s=60) for _ in range(rounds)]
    return {s["replica"]: s for s in states}


def test_two_replicas_follow_the_coordinator_and_agree(ray_head, serve_port, tmp_path):
    actor, client = start_in_process(ray_head, tmp_path / "state", NAMESPACE, NAME, ADAPTER, ADMIN, serve_port,
                                     replicas=2, num_cpus=0.5)
    try:
        token = enrol(actor, ADMIN, "replicas-test", remote=True)
        slot = ray.get(actor.reserve.remote(token, "pet", "dog")).slot
        art = make_artifact(load_base("tiny"), ADAPTER, "pet", slot, seed=3, b_scale=0.5)
        r = client.post("/v1/concepts", content=art.to_bytes(), headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 201, r.text

        states = replica_states()
        assert len(states) == 2, states  # both replicas were asked; neither holds a concept before it is used
        assert all(s["cache"]["held"] == 0 for s in states.values())

        body = {**SAMPLING, "prompt": "a photo of {pet}"}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: client.post("/v1/generate", json=body), range(8)))
        assert all(x.status_code == 200 for x in replies), [x.text[:200] for x in replies]
        images = [pixels(x.content) for x in replies]
        assert all(np.array_equal(images[0], im) for im in images[1:])  # same seed, same picture, any replica
        plain = pixels(client.post("/v1/generate", json={**SAMPLING, "prompt": "a photo of a dog"}).content)
        assert not np.array_equal(images[0], plain)

        held = replica_states()
        assert sum(s["cache"]["fetches"] for s in held.values()) <= 2  # each replica fetched it once at most
        assert all(s["cache"]["held"] == s["cache"]["fetches"] for s in held.values()), held
        gone = client.delete("/v1/concepts/pet", headers={"Authorization": f"Bearer {ADMIN}"})
        assert gone.status_code == 200, gone.text
        assert client.post("/v1/generate", json=body).status_code == 404  # refused at once, by the coordinator
    finally:
        client.close()
        stop_app(actor)
        ray.shutdown()
