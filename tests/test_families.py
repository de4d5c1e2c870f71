"""Every Stable Diffusion family end to end, each as its tiny random base: SD 1.x (epsilon), SD 2.x
(v-prediction) and SDXL (two text encoders, pooled embeds and time ids).

For each: train two concepts with the plain trainer -> artifacts uploaded over HTTP to the real
coordinator -> the Serve app draws `/v1/generate` with a subset, equal to the in-process merged
pipeline -> `GET /v1/lora` loaded by the family's own diffusers pipeline class (`load_lora_weights`
+ `fuse_lora`) gives W0 + Σ dW on every target of every component. A federation has one base, so
each family has its own coordinator and Serve app (under the route prefix /<family>); the three
start side by side on the session cluster, since starting is most of this module's time.
"""

from __future__ import annotations

import concurrent.futures

import httpx
import numpy as np
import pytest
import ray
import torch
from ray import serve

from blocklora.config import AdapterConfig, FederationConfig, GenerateConfig, TrainConfig
from blocklora.method.inject import find_targets
from blocklora.method.merge import LiveMerge
from blocklora.method.slots import phrase
from blocklora.pipeline.base import TINY, TINY_SD2, TINY_SDXL, load_base
from blocklora.pipeline.generate import generate
from blocklora.training.trainer import train_concept
from core_helpers import enrol, fused_weight, write_images
from federation import coordinator
from federation.auth import token_hash
from serve.app import AppArgs, build, start_http
from serve_helpers import connect, pixels, stop_app

pytestmark = pytest.mark.slow

NAMESPACE, NAME, ADMIN = "blocklora-families-test", "coordinator-families-test", "families-admin-token"
ADAPTER = AdapterConfig(rank=2, num_slots=3, text_targets=("q_proj", "v_proj"))
TRAIN = TrainConfig(steps=2, resolution=32, lr=1e-2, token_lr=1e-2)  # a few large steps: visible weights
SAMPLING = {"steps": 2, "guidance_scale": 4.0, "seed": 5, "width": 32, "height": 32}
# family id -> (base spec, the diffusers pipeline class it loads as, its scheduler's prediction type)
FAMILIES = {"sd1": (TINY, "StableDiffusionPipeline", "epsilon"),
            "sd2-v": (TINY_SD2, "StableDiffusionPipeline", "v_prediction"),
            "sdxl": (TINY_SDXL, "StableDiffusionXLPipeline", "epsilon")}


@pytest.fixture(scope="module")
def federations(ray_head, serve_port, tmp_path_factory) -> dict[str, tuple[ray.actor.ActorHandle, httpx.Client]]:
    """family -> (its coordinator, an HTTP client for its app); all started at once."""
    connect(ray_head, NAMESPACE)
    root = tmp_path_factory.mktemp("families")

    def start(family: str) -> ray.actor.ActorHandle:
        return coordinator.start(root / family, ADAPTER, FederationConfig(base=FAMILIES[family][0]),
                                 token_hash(ADMIN), f"{NAME}-{family}", NAMESPACE)

    with concurrent.futures.ThreadPoolExecutor(len(FAMILIES)) as pool:
        actors = dict(zip(FAMILIES, pool.map(start, FAMILIES)))
    start_http("127.0.0.1", serve_port)
    serve.run_many([serve.RunTarget(build(AppArgs(coordinator=f"{NAME}-{f}", namespace=NAMESPACE, num_cpus=0.5)),
                                    name=f"families-{f}", route_prefix=f"/{f}") for f in FAMILIES])
    clients = {f: httpx.Client(base_url=f"http://127.0.0.1:{serve_port}/{f}", timeout=120) for f in FAMILIES}
    yield {f: (actors[f], clients[f]) for f in FAMILIES}
    for f in FAMILIES:
        clients[f].close()
        stop_app(actors[f], f"families-{f}")
    ray.shutdown()


@pytest.mark.parametrize("family", FAMILIES)
def test_train_upload_serve_subset_and_export(family, federations, tmp_path):
    spec, pipeline_class, prediction = FAMILIES[family]
    base = load_base(spec)
    assert type(base.pipe).__name__ == pipeline_class
    assert base.pipe.scheduler.config.prediction_type == prediction
    actor, client = federations[family]
    token = enrol(actor, ADMIN, family, remote=True)
    arts = {}
    for i, name in enumerate(("pet", "toy")):
        slot = ray.get(actor.reserve.remote(token, name, "dog")).slot
        arts[name] = train_concept(base, write_images(tmp_path / name, seed=i), name, "dog", slot, ADAPTER,
                                   TRAIN, progress=False)
        r = client.post("/v1/concepts", content=arts[name].to_bytes(), headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 201, r.text
    assert set(arts["pet"].token_embeds()) == set(base.text_encoders)  # a trigger per text encoder

    # /v1/generate with the subset {pet} of the live {pet, toy} = the pipeline merged with pet alone
    r = client.post("/v1/generate", json={"prompt": "a photo of {pet}", **SAMPLING})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    served = pixels(r.content)
    LiveMerge(base, ADAPTER).set([arts["pet"]])
    cfg = GenerateConfig(**SAMPLING)
    want = np.asarray(generate(base, f"a photo of {phrase(arts['pet'])}", cfg)[0], dtype=np.int16)
    assert served.shape == (32, 32, 3) and np.abs(served - want).max() <= 2
    both = client.post("/v1/generate", json={"prompt": "a photo of {pet}", "concepts": ["toy"], **SAMPLING})
    assert both.status_code == 200 and both.content != r.content  # the subset drew it, not the live set

    # the live set as one standard LoRA file, loaded by diffusers' own pipeline of this family
    r = client.get("/v1/lora", params={"rule": "sum"})
    assert r.status_code == 200, r.text
    (tmp_path / "lora.safetensors").write_bytes(r.content)
    theirs = load_base(spec).pipe
    w0 = {k: lin.weight.clone() for k, lin in find_targets(theirs, ADAPTER).items()}
    theirs.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    theirs.fuse_lora()
    moved = set()
    for key, w in w0.items():
        fused = fused_weight(theirs, key)
        torch.testing.assert_close(fused, w + sum(a.delta(key) for a in arts.values()), rtol=0, atol=1e-5)
        if not torch.equal(fused, w):
            moved.add(key.partition(".")[0])
    assert moved == {"unet", *base.text_encoders}  # every component's LoRA was read, text_encoder_2 too
