"""Serving end to end: a real Ray cluster, the real coordinator, the app started by jobs/serve_up.py on
127.0.0.1, and real HTTP. Images are checked against the in-process LiveMerge pipeline.

The tests of this module run in order and share one deployment.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
import torch
from ray.util.state import list_actors
from safetensors.torch import load

from blocklora.config import AdapterConfig, GenerateConfig
from blocklora.method.inject import find_targets
from blocklora.method.merge import LiveMerge
from blocklora.method.slots import phrase
from blocklora.pipeline.base import load_base
from blocklora.pipeline.generate import generate
from core_helpers import enrol, fused_weight, make_artifact, model_code_imported
from prerun import Runner
from serve_helpers import pixels, serve_up, start_coordinator, stop_app

pytestmark = pytest.mark.slow

NAMESPACE, NAME = "blocklora-serve-test", "coordinator-serve-test"
ADAPTER = AdapterConfig(rank=2, num_slots=3)
ADMIN = "serve-test-admin-token"
SAMPLING = {"steps": 3, "guidance_scale": 4.0, "seed": 11}


@pytest.fixture(scope="module")
def srv(ray_head, serve_port, tmp_path_factory):
    """Coordinator + two live concepts uploaded over HTTP + the app; yields what the tests need."""
    root = tmp_path_factory.mktemp("serve")
    ray.init(address=ray_head.address, namespace=NAMESPACE, log_to_driver=False)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # side by side, as the main job starts them
        started = pool.submit(start_coordinator, ray_head, root / "state", NAMESPACE, NAME, ADAPTER, ADMIN)
        client = pool.submit(serve_up, ray_head, serve_port, NAMESPACE, NAME).result()
        actor = started.result()
    token = enrol(actor, ADMIN, "serve-test", remote=True)
    base = load_base("tiny")
    arts = {}
    for i, name in enumerate(("a", "b")):
        slot = ray.get(actor.reserve.remote(token, name, "dog")).slot
        arts[name] = make_artifact(base, ADAPTER, name, slot, seed=i + 1, b_scale=0.5)
        r = client.post("/v1/concepts", files={"artifact": (f"{name}.safetensors", arts[name].to_bytes())},
                        headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 201, r.text
    yield dataclasses.make_dataclass("Srv", ["client", "actor", "token", "arts", "base"])(
        client, actor, token, arts, base)
    client.close()
    stop_app(actor)
    ray.shutdown()


def reference(srv, names: list[str], prompt: str) -> np.ndarray:
    """The image of the single-process pipeline merged with `names` (LiveMerge), same seed."""
    merged = LiveMerge(srv.base, ADAPTER)
    merged.set([srv.arts[n] for n in names])
    text = prompt.format(**{n: phrase(srv.arts[n]) for n in names})
    image = generate(srv.base, text, GenerateConfig(width=32, height=32, **SAMPLING))[0]
    merged.set([])
    return np.asarray(image, dtype=np.int16)


def post(srv, **body) -> httpx.Response:
    return srv.client.post("/v1/generate", json={**SAMPLING, **body})


@pytest.mark.parametrize("names", [[], ["a"], ["a", "b"]], ids=["none", "a", "a+b"])
def test_generate_equals_merged_pipeline(srv, names):
    prompt = "a photo of " + " and ".join("{%s}" % n for n in names) if names else "a photo of a dog"
    r = post(srv, prompt=prompt)  # {name} in the prompt adds the concept
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and int(r.headers["x-blocklora-version"]) >= 2
    got, want = pixels(r.content), reference(srv, names, prompt.replace("{", "{").replace("}", "}"))
    assert np.abs(got - want).max() <= 2
    assert post(srv, prompt=prompt).content == r.content  # same request, version and seed: same bytes


def test_concepts_listed_and_weights_matter(srv):
    listed = srv.client.get("/v1/concepts").json()
    assert {c["name"]: c["slot"] for c in listed["concepts"]} == {n: a.meta.slot for n, a in srv.arts.items()}
    health = srv.client.get("/v1/healthz").json()
    assert health["status"] == "ok" and health["version"] == listed["version"] and health["live"] == 2
    assert {"hits", "misses", "hit_rate", "bytes", "budget_bytes"} <= set(health["replica_cache"])
    assert health["quarantined"] == [] and health["quarantined_count"] == 0
    full = post(srv, prompt="a photo of a dog", concepts=["a"]).content
    zero = post(srv, prompt="a photo of a dog", concepts=[{"name": "a", "weight": 0.0}]).content
    none = post(srv, prompt="a photo of a dog").content
    assert zero == none and full != none


@pytest.mark.parametrize("rule, alpha", [("sum", 1.0), ("mean", 0.5)])
def test_live_set_downloads_as_one_lora_that_diffusers_loads(srv, tmp_path, rule, alpha):
    r = srv.client.get("/v1/lora", params={"rule": rule})
    assert r.status_code == 200, r.text
    assert int(r.headers["x-blocklora-version"]) >= 2
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(r.content)
    theirs = load_base("tiny")
    w0 = {k: lin.weight.clone() for k, lin in find_targets(theirs.pipe, ADAPTER).items()}
    theirs.pipe.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    theirs.pipe.fuse_lora()
    for key, w in w0.items():
        expected = w + alpha * sum(a.delta(key) for a in srv.arts.values())  # W0 + Σ α dW of the live set
        torch.testing.assert_close(fused_weight(theirs.pipe, key), expected, rtol=0, atol=1e-6)
    assert srv.client.get("/v1/lora", params={"rule": "ties"}).status_code == 422


def test_several_images_and_mixed_batch(srv):
    r = post(srv, prompt="a photo of {a}", num_images=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seeds"] == [11, 12] and body["version"] >= 2
    first = base64.b64decode(body["images"][0])
    assert np.abs(pixels(first) - pixels(post(srv, prompt="a photo of {a}").content)).max() <= 2
    bodies = [{"prompt": "a photo of {a}"}, {"prompt": "a photo of {b}", "width": 32},
              {"prompt": "a photo of a dog"}, {"prompt": "{a} and {b}", "width": 48, "height": 40}]
    alone = [pixels(post(srv, **b).content) for b in bodies]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:  # batched together by @serve.batch
        together = list(pool.map(lambda b: post(srv, **b), bodies))
    for r, a in zip(together, alone):
        assert r.status_code == 200 and np.abs(pixels(r.content) - a).max() <= 2
    assert alone[3].shape == (40, 48, 3)


def test_a_library_slot_shared_clashes_named_collections_and_pages(srv):
    """A third concept in a's slot (the admin's upload into the artifact's own slot): merged with a
    it is a named 409, alone or beside a in one batch each picture is its own; a collection of it
    and b is served as one LoRA and by name; the listing pages."""
    slot = srv.arts["a"].meta.slot
    srv.arts["c"] = make_artifact(srv.base, ADAPTER, "c", slot, seed=7, b_scale=0.5)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    r = srv.client.post("/v1/concepts", content=srv.arts["c"].to_bytes(), headers=admin)
    assert r.status_code == 201 and r.json()["slot"] == slot, r.text
    try:
        r = post(srv, prompt="{a} and {c}")
        assert r.status_code == 409 and f"'a' and 'c' are both in slot {slot}" in r.text, r.text
        verdict = srv.client.get("/v1/mergeable", params={"concepts": "a,c,b,ghost"}).json()
        assert verdict == {"mergeable": False, "slots": {"a": slot, "c": slot, "b": srv.arts["b"].meta.slot},
                           "clashes": [{"slot": slot, "concepts": ["a", "c"]}], "unknown": ["ghost"]}
        assert srv.client.get("/v1/mergeable", params={"concepts": "c,b"}).json()["mergeable"]
        bodies = [{"prompt": "a photo of {a}"}, {"prompt": "a photo of {c}"}, {"prompt": "{c} and {b}"}]
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:  # a and c share a slot, not a picture
            together = list(pool.map(lambda b: post(srv, **b), bodies))
        for r, names, body in zip(together, (["a"], ["c"], ["c", "b"]), bodies):
            assert r.status_code == 200, r.text
            assert np.abs(pixels(r.content) - reference(srv, names, body["prompt"])).max() <= 2
        owner = {"Authorization": f"Bearer {srv.token}"}
        r = srv.client.put("/v1/collections/pair", json={"members": ["c", "b"]}, headers=owner)
        assert r.status_code == 200 and r.json()["members"] == {"c": slot, "b": srv.arts["b"].meta.slot}, r.text
        for body, status in (({"members": ["a", "c"]}, 409), ({"members": ["ghost"]}, 404), ({"members": "a"}, 422)):
            assert srv.client.put("/v1/collections/pair", json=body, headers=owner).status_code == status
        assert srv.client.put("/v1/collections/pair", json={"members": ["a"]}).status_code == 401
        lora = srv.client.get("/v1/lora", params={"collection": "pair"})
        tensors = load(lora.content)
        for key in srv.arts["b"].meta.layout:
            got = tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]
            torch.testing.assert_close(got, srv.arts["b"].delta(key) + srv.arts["c"].delta(key), rtol=1e-5, atol=1e-6)
        by_name = post(srv, prompt="a photo of a dog", collection="pair")
        assert np.abs(pixels(by_name.content) - reference(srv, ["c", "b"], "a photo of a dog")).max() <= 2
        listed = [c["name"] for c in srv.client.get("/v1/collections").json()["collections"]]
        assert listed == ["default", "pair"]
        first = srv.client.get("/v1/concepts", params={"limit": 2}).json()
        assert [c["name"] for c in first["concepts"]] == ["a", "b"] and first["total"] == 3
        rest = srv.client.get("/v1/concepts", params={"limit": 2, "cursor": first["next_cursor"]}).json()
        assert [c["name"] for c in rest["concepts"]] == ["c"] and rest["next_cursor"] is None
        assert srv.client.get("/v1/concepts", params={"slot": slot}).json()["total"] == 2
        assert srv.client.get("/v1/concepts", params={"cursor": "@@"}).status_code == 400
        assert srv.client.get("/v1/concepts", params={"limit": 0}).status_code == 422
        assert srv.client.delete("/v1/collections/pair", headers=owner).status_code == 200
    finally:
        assert srv.client.delete("/v1/concepts/c", headers=admin).status_code == 200
        del srv.arts["c"]


BAD = [  # (body or raw bytes, status, text the message must contain)
    ({"prompt": "x", "concepts": ["ghost"]}, 404, "ghost"),
    ({"prompt": "a {phantom} here"}, 404, "phantom"),
    ({"prompt": "x", "steps": 0}, 422, "greater than or equal to 1"),
    ({"prompt": "x", "steps": 101}, 422, "less than or equal to 100"),
    ({"prompt": "x", "width": 2048}, 422, "less than or equal to 1024"),
    ({"prompt": "x", "height": 36}, 422, "multiple of 8"),
    ({"prompt": "x", "num_images": 5}, 422, "less than or equal to 4"),
    ({"prompt": "x" * 1001}, 422, "at most 1000 characters"),
    ({"prompt": ""}, 422, "at least 1 character"),
    ({"prompt": "x", "concepts": ["a", "a"]}, 422, "more than once"),
    ({"prompt": "x", "colour": "red"}, 422, "Extra inputs"),
    (b'{"prompt": "x",', 400, "not valid JSON"),
]


def test_bad_input_gets_its_status_and_does_not_disturb_others(srv):
    def send(case):
        body, _, _ = case
        if isinstance(body, bytes):
            return srv.client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
        return post(srv, **body)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        good = pool.submit(post, srv, prompt="a photo of {a}")
        results = list(pool.map(send, BAD))
    for (body, status, text), r in zip(BAD, results):
        assert r.status_code == status, (body, r.text)
        assert text in r.text, (body, r.text)
    assert good.result().status_code == 200
    admin = [("delete", "/v1/concepts/a", {}, 401), ("delete", "/v1/concepts/a", {"Authorization": "Bearer nope"}, 403),
             ("post", "/v1/concepts", {"Authorization": "Bearer nope"}, 403),
             ("delete", "/v1/concepts/ghost", {"Authorization": f"Bearer {ADMIN}"}, 404)]
    for method, path, headers, status in admin:
        r = srv.client.request(method, path, headers=headers, content=b"x" * 64)
        assert r.status_code == status, (method, path, r.text)
    r = srv.client.post("/v1/concepts", content=b"not a safetensors file",
                        headers={"Authorization": f"Bearer {srv.token}"})
    assert r.status_code == 422 and "artifact refused" in r.text


def test_removed_concept_refused_within_a_second_then_served_again(srv):
    before = post(srv, prompt="a photo of {a}").content
    r = srv.client.delete("/v1/concepts/a", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    removed_at = time.monotonic()
    r = post(srv, prompt="a photo of {a}")
    assert r.status_code == 404 and "'a'" in r.text and time.monotonic() - removed_at < 1.0
    assert post(srv, prompt="a photo of {b}").status_code == 200  # the others stay live
    assert srv.client.get("/v1/concepts").json()["concepts"][0]["name"] == "b"
    slot = ray.get(srv.actor.reserve.remote(srv.token, "a", "dog")).slot
    assert slot == srv.arts["a"].meta.slot  # the lowest free slot is the one it left
    r = srv.client.post("/v1/concepts", content=srv.arts["a"].to_bytes(),
                        headers={"Authorization": f"Bearer {srv.token}"})
    assert r.status_code == 201, r.text
    again = post(srv, prompt="a photo of {a}")
    assert again.status_code == 200 and again.content == before


def app_build_imports(folder: Path, run: Runner) -> tuple[list[str], str]:
    return model_code_imported("from serve.app import AppArgs, build; build(AppArgs())", run=run)


@pytest.mark.prerun(job=app_build_imports)
def test_building_the_app_does_not_import_the_model_code(prerun):
    """jobs/serve_up.py only binds the deployments: the generator imports diffusers in its replica, so
    the driver reaches `serve.run` ~4 s of a core sooner (the main job's Serve stage waits on it)."""
    (imported, _), _ = prerun
    assert imported == []


def test_the_ingress_process_never_loads_torch(srv, ray_head):
    """The HTTP front only checks requests and encodes PNGs: what a generator replica returns or raises
    comes from `serve.replies`, so after serving pictures the ingress replica's process has still not
    loaded torch (about 7 s of one core saved per app start), while the generator's has."""
    assert post(srv, prompt="a photo of {b}").status_code == 200
    actors = list_actors(address=ray_head.dashboard_url, filters=[("state", "=", "ALIVE")], detail=True,
                         limit=10_000, raise_on_missing_output=False)
    maps = {kind: [Path(f"/proc/{a.pid}/maps").read_text() for a in actors if kind in (a.class_name or "")]
            for kind in ("Ingress", "Generator")}
    assert len(maps["Ingress"]) == 1 and maps["Generator"], [a.class_name for a in actors]
    assert "libtorch" not in maps["Ingress"][0]
    assert all("libtorch" in m for m in maps["Generator"])


def test_a_bfloat16_app_serves_the_live_concepts(srv, ray_head, serve_port):
    """`serve_up.py --dtype bfloat16` replaces the app: its replica loads the base in bf16 (the same
    fingerprint, so it follows the same federation) and draws a live concept within rounding of the
    float32 app's picture, not bit for bit."""
    body = {"prompt": "a photo of {b}"}
    f32 = pixels(post(srv, **body).content)
    client = serve_up(ray_head, serve_port, NAMESPACE, NAME, flags=("--dtype", "bfloat16"))
    try:
        r = client.post("/v1/generate", json={**SAMPLING, **body})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        diff = np.abs(pixels(r.content) - f32)
        assert 0 < diff.mean() < 4, diff.mean()
    finally:
        client.close()
