"""The model deployment: one base pipeline per replica, holding the concepts its requests use.

A replica loads the base once and wraps its target layers in a `ConceptBank`. Each request comes
with its plan (the coordinator's resolution of its concepts to exact artifacts); the replica's
`ConceptCache` makes sure those are held (fetched from the coordinator when missing, least recently
used out past `--concept-cache-mb`) before the request joins a batch, so a batch never waits on a
fetch. Requests with different subsets of concepts, prompts and seeds share one denoising loop; only
requests with the same steps, guidance and size can share it, so a batch runs one loop per group.

A loop whose callers have all gone (their HTTP clients disconnected) is stopped from inside the model:
every block of the UNet and of the VAE's decoder first checks, so the work ends within the block in
progress instead of after the step, or the whole loop and its decode.
"""

from __future__ import annotations

import asyncio
import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import ray
import torch
from ray import serve
from ray.util import metrics

from blocklora.method.residual import ConceptBank
from blocklora.pipeline.precision import dtype_of
from blocklora.pipeline.prompts import expand
from federation.coordinator import START_WAIT_S, get as coordinator_named
from federation.errors import UnknownConcept
from federation.protocol import FederationInfo, Plan
from serve.concept_cache import ConceptCache
from serve.replies import ConceptUnavailable, DrawnImages
from serve.schemas import GenerateRequest

DEFAULT_CACHE_MB = 1024.0


@dataclass
class _Job:
    """One request in a batch, with its plan and the bank keys of its concepts; `cancelled` is set
    when its caller went away (the HTTP client disconnected and Serve cancelled the call), so nobody
    waits for its images any more."""

    request: GenerateRequest
    plan: Plan
    keys: list[str]
    cancelled: bool = False


class Abandoned(Exception):
    """Raised inside the model when every caller of the loop in progress has gone."""


@contextmanager
def stop_points(modules: list[torch.nn.Module], abandoned: Callable[[], bool]) -> Iterator[None]:
    """Raise Abandoned before any of `modules` runs once `abandoned()` is true (a forward pre-hook
    on each, removed on exit)."""
    def check(module: torch.nn.Module, args: tuple) -> None:
        if abandoned():
            raise Abandoned
    handles = [m.register_forward_pre_hook(check) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16,
                  user_config={"max_batch_size": 4, "batch_wait_timeout_s": 0.05, "concept_cache_mb": DEFAULT_CACHE_MB})
class Generator:
    """Serves the federation of the coordinator named `coordinator` in `namespace`; `device` None:
    CUDA if present; `dtype` (a --dtype name) is the base's, and the concepts' rows are applied in it."""

    def __init__(self, coordinator: str, namespace: str, device: str | None = None, dtype: str = "float32") -> None:
        # diffusers is imported here, in the replica: the driver that builds the app (jobs/serve_up.py)
        # only binds this class, and would otherwise spend ~4 s of a core importing the model code
        from blocklora.pipeline.base import load_base

        self.coordinator = coordinator_named(coordinator, namespace, wait_s=START_WAIT_S)
        info: FederationInfo = ray.get(self.coordinator.info.remote())
        base = load_base(info.base_spec, device=device, dtype=dtype_of(dtype))
        if base.fingerprint != info.base_fingerprint:
            raise RuntimeError(f"base {info.base_spec!r} loaded here has fingerprint {base.fingerprint[:12]}…, "
                               f"the federation's is {info.base_fingerprint[:12]}…; replicas need the same weights")
        self.bank = ConceptBank(base, info.adapter)
        lookups = metrics.Counter("blocklora_concept_cache_lookups", "concepts looked up in a replica's cache",
                                  tag_keys=("result",))
        self.cache = ConceptCache(self.bank, int(DEFAULT_CACHE_MB * 2**20), self._fetch,
                                  lambda hit: lookups.inc(tags={"result": "hit" if hit else "miss"}))
        self.lock = asyncio.Lock()  # one denoising loop at a time: the bank's per-batch weights are shared
        self.cancelled_loops = 0  # denoising loops skipped or stopped because every caller had gone
        self.steps = 0  # denoising steps completed, all loops together
        unet, decoder = base.pipe.unet, base.pipe.vae.decoder
        self.blocks = [*unet.down_blocks, *filter(None, [unet.mid_block]), *unet.up_blocks, *decoder.up_blocks]
        self.waiting = 0  # generate calls not yet answered: while any is, no thumbnail is drawn
        self.background: _Job | None = None  # the thumbnail being drawn, which gives way to them

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Runtime knobs (Serve's user_config): batch size, how long a batch waits to fill, and the
        MiB of concepts the cache holds (a smaller budget evicts at once, pinned concepts excepted)."""
        self._batched.set_max_batch_size(int(config["max_batch_size"]))
        self._batched.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))
        self.cache.resize(int(float(config.get("concept_cache_mb", DEFAULT_CACHE_MB)) * 2**20))

    async def _fetch(self, name: str, sha256: str) -> bytes:
        try:
            return await self.coordinator.artifact.remote(name, sha256)
        except UnknownConcept:  # removed or replaced since the ingress resolved the request
            raise ConceptUnavailable([name], -1) from None

    async def status(self) -> dict[str, Any]:
        """This replica: who it is, its concept cache (held, bytes, hits and misses), whether a loop is
        running, its denoising steps and cancelled loops so far. It answers at once, also while a loop
        runs (a health check must not wait for a loop)."""
        return {"replica": serve.get_replica_context().replica_id.unique_id, "cache": self.cache.stats(),
                "busy": self.lock.locked(), "steps": self.steps, "cancelled_loops": self.cancelled_loops}

    async def generate(self, request: GenerateRequest, plan: Plan) -> DrawnImages:
        """Images for one request and its plan; raises ConceptUnavailable naming a concept that was
        removed or replaced since the plan was made."""
        keys = await self.cache.acquire(plan.concepts)  # before the batch: no batch waits on a fetch
        job = _Job(request, plan, keys)
        self.waiting += 1
        if self.background is not None:
            self.background.cancelled = True  # a thumbnail's loop stops at its next step
        try:
            result = await self._batched(job)
        except asyncio.CancelledError:
            job.cancelled = True  # the batch skips or interrupts a loop nobody waits for
            raise
        finally:
            self.cache.release(keys)
            self.waiting -= 1
        if isinstance(result, Exception):
            raise result
        return result

    async def thumbnail(self, request: GenerateRequest, plan: Plan) -> DrawnImages | None:
        """A picture for the page's concept card, drawn only while no generate call waits here: one
        that arrives stops it between two denoising steps, so it delays nobody by more than a step.
        None: it gave way, ask again later. Raises ConceptUnavailable like `generate`."""
        keys = await self.cache.acquire(plan.concepts)
        job = _Job(request, plan, keys)
        try:
            async with self.lock:
                loops, self.background = self.cancelled_loops, job  # from here on, a generate call stops it
                try:
                    if self.waiting or job.cancelled:
                        return None
                    pixels = await asyncio.to_thread(self._run, [job])
                finally:
                    self.cancelled_loops, self.background = loops, None  # giving way is not being abandoned
        finally:
            self.cache.release(keys)
        return None if pixels is None else DrawnImages(plan.version, [request.seed], pixels[0])

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _batched(self, jobs: list[_Job]) -> list[DrawnImages | Exception]:
        requests = [j.request for j in jobs]
        results: list[DrawnImages | Exception | None] = [None] * len(requests)
        res = self.bank.base.resolution
        key = lambda i: (requests[i].steps, requests[i].guidance_scale,  # noqa: E731
                         requests[i].width or res, requests[i].height or res)
        for _, group in itertools.groupby(sorted(range(len(jobs)), key=key), key=key):
            group = list(group)
            if all(jobs[i].cancelled for i in group):
                self.cancelled_loops += 1
                continue
            async with self.lock:
                pixels = await asyncio.to_thread(self._run, [jobs[i] for i in group])
            if pixels is None:
                continue
            for i, px in zip(group, pixels):
                seeds = [requests[i].seed + j for j in range(requests[i].num_images)]
                results[i] = DrawnImages(jobs[i].plan.version, seeds, px)
        return results

    @torch.no_grad()
    def _run(self, jobs: list[_Job]) -> list[np.ndarray] | None:
        """One denoising loop for requests of equal steps/guidance/size; image j of a request is
        drawn from its own generator seeded `seed + j`, so it does not depend on its batch mates.
        None: every caller went away and the loop was stopped (within the model block in progress)."""
        requests = [j.request for j in jobs]
        prompts, negatives, subsets, gens = [], [], [], []
        for job, req in zip(jobs, requests):
            phrases = {c.name: c.phrase for c in job.plan.concepts}
            prompt = expand(req.prompt, phrases)
            subset = {key: c.weight for key, c in zip(job.keys, job.plan.concepts)}
            for j in range(req.num_images):
                prompts.append(prompt)
                negatives.append(req.negative_prompt)
                subsets.append(subset)
                gens.append(torch.Generator(device="cpu").manual_seed(req.seed + j))
        first, res = requests[0], self.bank.base.resolution

        def count_step(pipe, step: int, timestep, kwargs: dict) -> dict:
            self.steps += 1
            return kwargs

        try:
            with self.bank.subsets(subsets), stop_points(self.blocks, lambda: all(j.cancelled for j in jobs)):
                out = self.bank.base.pipe(prompts, negative_prompt=negatives, num_inference_steps=first.steps,
                                          guidance_scale=first.guidance_scale, width=first.width or res,
                                          height=first.height or res, generator=gens, output_type="np",
                                          callback_on_step_end=count_step).images
        except Abandoned:
            self.cancelled_loops += 1
            return None
        pixels = (out * 255).round().clip(0, 255).astype(np.uint8)  # as diffusers' numpy_to_pil
        bounds = np.cumsum([0] + [r.num_images for r in requests])
        return [pixels[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
