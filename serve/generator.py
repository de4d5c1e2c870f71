"""The model deployment: one base pipeline per replica, following the coordinator's live concepts.

A replica loads the base once, wraps its target layers in a `ConceptBank`, and before every batch
brings the bank to the coordinator's version by adding or removing only the concepts that changed.
Requests with different subsets of concepts, prompts and seeds share one denoising loop; only
requests with the same steps, guidance and size can share it, so a batch runs one loop per group.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray import serve

from blocklora.method.artifact import ConceptArtifact
from blocklora.method.residual import ConceptBank
from blocklora.pipeline.precision import dtype_of
from blocklora.pipeline.prompts import expand
from federation.coordinator import START_WAIT_S, get as coordinator_named
from federation.protocol import FederationInfo, LiveSet
from serve.replies import ConceptUnavailable, DrawnImages
from serve.schemas import GenerateRequest


@dataclass
class _Job:
    """One request in a batch; `cancelled` is set when its caller went away (the HTTP client
    disconnected and Serve cancelled the call), so nobody waits for its images any more."""

    request: GenerateRequest
    cancelled: bool = False


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16,
                  user_config={"max_batch_size": 4, "batch_wait_timeout_s": 0.05})
class Generator:
    """Follows the coordinator named `coordinator` in `namespace`; `device` None: CUDA if present;
    `dtype` (a --dtype name) is the base's, and the concepts' rows are applied in it."""

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
        self.version = -1
        self.digests: dict[str, str] = {}  # live name -> artifact sha256, to see a re-upload under a name
        self.lock = asyncio.Lock()  # the bank changes only between batches, never under one
        self.cancelled_loops = 0  # denoising loops skipped or stopped because every caller had gone

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Runtime knobs (Serve's user_config): batch size and how long a batch waits to fill."""
        self._batched.set_max_batch_size(int(config["max_batch_size"]))
        self._batched.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))

    async def _sync(self) -> None:
        """Apply only what changed since our version: removed concepts first (their slots free up)."""
        state: LiveSet = await self.coordinator.state.remote(self.version)
        if not state.changed:
            return
        live = state.concepts
        for name in [n for n, d in self.digests.items() if n not in live or live[n].sha256 != d]:
            self.bank.remove(name)
            del self.digests[name]
        for name, c in live.items():
            if name not in self.digests:
                self.bank.add(ConceptArtifact.from_bytes(await state.artifacts[name]))
                self.digests[name] = c.sha256
        self.version = state.version

    async def status(self) -> dict[str, Any]:
        """This replica after a sync: who it is, the version it serves and its live concepts' slots."""
        async with self.lock:
            await self._sync()
            return {"replica": serve.get_replica_context().replica_id.unique_id, "version": self.version,
                    "slots": {n: a.meta.slot for n, a in self.bank.live.items()},
                    "cancelled_loops": self.cancelled_loops}

    async def generate(self, request: GenerateRequest) -> DrawnImages:
        """Images for one request; raises ConceptUnavailable naming concepts that are not live."""
        job = _Job(request)
        try:
            result = await self._batched(job)
        except asyncio.CancelledError:
            job.cancelled = True  # the batch skips or interrupts a loop nobody waits for
            raise
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _batched(self, jobs: list[_Job]) -> list[DrawnImages | Exception]:
        requests = [j.request for j in jobs]
        async with self.lock:
            await self._sync()
            results: list[DrawnImages | Exception | None] = [None] * len(requests)
            runnable = []
            for i, req in enumerate(requests):
                missing = [n for n in req.subset() if n not in self.bank.live]
                if missing:
                    results[i] = ConceptUnavailable(missing, self.version)
                else:
                    runnable.append(i)
            res = self.bank.base.resolution
            key = lambda i: (requests[i].steps, requests[i].guidance_scale,  # noqa: E731
                             requests[i].width or res, requests[i].height or res)
            for _, group in itertools.groupby(sorted(runnable, key=key), key=key):
                group = list(group)
                if all(jobs[i].cancelled for i in group):
                    self.cancelled_loops += 1
                    continue
                pixels = await asyncio.to_thread(self._run, [jobs[i] for i in group])
                if pixels is None:
                    continue
                for i, px in zip(group, pixels):
                    seeds = [requests[i].seed + j for j in range(requests[i].num_images)]
                    results[i] = DrawnImages(self.version, seeds, px)
            return results

    @torch.no_grad()
    def _run(self, jobs: list[_Job]) -> list[np.ndarray] | None:
        """One denoising loop for requests of equal steps/guidance/size; image j of a request is
        drawn from its own generator seeded `seed + j`, so it does not depend on its batch mates.
        None: every caller went away and the loop was stopped between two steps."""
        requests = [j.request for j in jobs]
        phrases = self.bank.phrases()
        prompts, negatives, subsets, gens = [], [], [], []
        for req in requests:
            prompt, subset = expand(req.prompt, phrases), req.subset()
            for j in range(req.num_images):
                prompts.append(prompt)
                negatives.append(req.negative_prompt)
                subsets.append(subset)
                gens.append(torch.Generator(device="cpu").manual_seed(req.seed + j))
        first, res = requests[0], self.bank.base.resolution

        def stop_when_abandoned(pipe, step: int, timestep, kwargs: dict) -> dict:
            if all(j.cancelled for j in jobs):
                pipe._interrupt = True  # diffusers skips the remaining steps
            return kwargs

        with self.bank.subsets(subsets):
            out = self.bank.base.pipe(prompts, negative_prompt=negatives, num_inference_steps=first.steps,
                                      guidance_scale=first.guidance_scale, width=first.width or res,
                                      height=first.height or res, generator=gens, output_type="np",
                                      callback_on_step_end=stop_when_abandoned).images
        if all(j.cancelled for j in jobs):
            self.cancelled_loops += 1
            return None
        pixels = (out * 255).round().clip(0, 255).astype(np.uint8)  # as diffusers' numpy_to_pil
        bounds = np.cumsum([0] + [r.num_images for r in requests])
        return [pixels[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
