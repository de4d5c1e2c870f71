"""Serving cost of per-request concept subsets: UNet step latency and throughput, four ways.

    python -m benchmarks.serve_bench            # tiny + SD1.5-shaped UNet, 32x32 latents (~15 min)
    python -m benchmarks.serve_bench --quick    # 16x16 latents, fewer repeats (< 5 min, 2 cores)

One batch is `batch` requests, each with classifier-free guidance (UNet batch 2 x batch):
- (a) base: the UNet with no concept;
- (b) fused: one subset merged into W (LiveMerge) and shared by the whole batch;
- (c) mixed: every request a different subset, one forward through blocklora.method.residual's layers
  (`gathered` kernel, the default; c_union: the same batch with the `union` kernel);
- (d) peft: the same concepts as plain LoRAs in diffusers + peft, which cannot mix subsets in one
  forward, so each request runs alone after `set_adapters` (d) or `fuse_lora`/`unfuse_lora` (d_fuse).
Per-step latency is one UNet call for the whole batch ((d): one batch-of-one call per request,
plus its switch (set_adapters, or fuse+unfuse) paid once per request and amortised over `steps`). The cases
take turns round by round; (d) runs in a first phase (peft wraps the layers), rescaled by the (a)
measured beside it, the rest in a second. Ratios are to (a) of the same model and run. c_same_subset:
the mixed path when the whole batch happens to ask for one subset (what a fused fast path would save).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from typing import Callable

import torch
from diffusers.utils import logging as diffusers_logging

from benchmarks.common import DTYPES, add_device_args, emit, environment, random_artifact, sd15_base, sync
from blocklora.config import AdapterConfig
from blocklora.method.export import to_lora_state_dict
from blocklora.method.inject import layout
from blocklora.method.merge import LiveMerge
from blocklora.method.residual import ConceptBank
from blocklora.pipeline.base import Base, load_base

ADAPTER = AdapterConfig(rank=4, num_slots=16)
LIVE = 16  # concepts loaded; each request asks for two of them


Case = tuple[Callable[[], object], Callable[[], object]]  # (untimed setup, timed work)


def interleaved(cases: dict[str, Case], rounds: int) -> dict[str, float]:
    """Median seconds per case, the cases taking turns round by round: on a shared machine a
    burst of load then hits every case alike instead of whichever happened to run during it."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for setup, fn in cases.values():
        setup()
        fn()  # warm-up: first calls allocate
    for _ in range(rounds):
        for name, (setup, fn) in cases.items():
            setup()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def subsets(batch: int) -> list[dict[str, float]]:
    """Request i asks for concepts 2i and 2i+1 (mod LIVE): every request of a batch differs and, at 8
    requests, together they ask for all 16 live concepts."""
    return [{f"concept{2 * i % LIVE}": 1.0, f"concept{(2 * i + 1) % LIVE}": 1.0} for i in range(batch)]


def bench_model(label: str, base: Base, latent: int, batch: int, steps: int, rounds: int) -> dict:
    unet = base.pipe.unet
    g = torch.Generator().manual_seed(0)
    width = unet.config.cross_attention_dim
    x = torch.randn(2 * batch, 4, latent, latent, generator=g).to(unet.device, unet.dtype)
    cond = torch.randn(2 * batch, 77, width, generator=g).to(unet.device, unet.dtype)
    t = torch.tensor(500, device=unet.device)
    lay = layout(base.pipe, ADAPTER)
    arts = {f"concept{k}": random_artifact(base, ADAPTER, lay, k, seed=k) for k in range(LIVE)}
    reqs = subsets(batch)

    @torch.no_grad()
    def step(n: int = batch) -> torch.Tensor:
        return unet(x[: 2 * n] if n == batch else torch.cat([x[:n], x[batch:batch + n]]),
                    t, cond[: 2 * n] if n == batch else torch.cat([cond[:n], cond[batch:batch + n]])).sample

    # phase 1, (d): peft adapters on the UNet; each request alone, its subset switched in first
    for name, art in arts.items():
        base.pipe.load_lora_weights(to_lora_state_dict([art]), adapter_name=name)

    def switch(fuse: bool) -> None:  # what each request of the batch pays once, before its steps
        for subset in reqs:
            base.pipe.enable_lora()
            base.pipe.set_adapters(list(subset), list(subset.values()))
            if fuse:
                base.pipe.fuse_lora(components=["unet"], adapter_names=list(subset))
                base.pipe.unfuse_lora(components=["unet"])

    def alone() -> None:  # one step of each request on its own (batch 2 with CFG)
        for _ in reqs:
            step(1)

    def lora(on: bool) -> Callable[[], None]:
        def setup() -> None:
            base.pipe.set_adapters(list(reqs[0]), [1.0, 1.0])
            base.pipe.enable_lora() if on else base.pipe.disable_lora()  # off: a fused UNet's cost
        return setup

    peft = interleaved({"a_base": (lora(False), step), "set_adapters": (lora(True), lambda: switch(False)),
                        "fuse_unfuse": (lora(True), lambda: switch(True)), "alone_lora": (lora(True), alone),
                        "alone_fused": (lora(False), alone)}, rounds)
    base.pipe.enable_lora()
    base.pipe.set_adapters(list(reqs[0]), [1.0, 1.0])
    peft_out = step(1)
    base.pipe.unload_lora_weights()

    # phase 2: LiveMerge holds the fused subset in W; the serving layers add the mixed subsets
    live = LiveMerge(base, ADAPTER)  # before the bank wraps the layers: it keeps the plain linears
    bank = ConceptBank(base, ADAPTER)
    for art in arts.values():
        bank.add(art)

    def run(fused: list[str], mixed: list[dict[str, float]] | None, kernel: str = "gathered") -> Case:
        def setup() -> None:
            live.set([arts[n] for n in fused])
            bank.kernel = kernel

        def case() -> None:
            if mixed is None:
                step()
            else:
                with bank.subsets(mixed):
                    step()
        return setup, case

    res = interleaved({"a_base": run([], None), "b_fused": run(list(reqs[0]), None),
                       "c_mixed": run([], reqs), "c_same_subset": run([], [reqs[0]] * batch),
                       "c_union": run([], reqs, "union")}, rounds)
    live.set([arts[n] for n in reqs[0]])
    fused_out = step(1)
    live.set([])
    with bank.subsets(reqs[:1]):
        mixed_out = step(1)
    bank.kernel = "union"
    with bank.subsets(reqs[:1]):
        union_out = step(1)
    bank.kernel = "gathered"
    scale = res["a_base"] / peft["a_base"]  # phase 1 onto phase 2's clock
    res["d_peft"] = (peft["alone_lora"] + peft["set_adapters"] / steps) * scale
    res["d_peft_fuse"] = (peft["alone_fused"] + peft["fuse_unfuse"] / steps) * scale

    ms = {k: round(v * 1000, 2) for k, v in res.items()}
    return {
        "model": label, "latent": latent, "batch": batch, "unet_batch": 2 * batch, "steps": steps,
        "rounds": rounds, "step_ms": ms, "peft_phase_step_ms": {k: round(v * 1000, 2) for k, v in peft.items()},
        "ratio_to_base": {k: round(v / res["a_base"], 3) for k, v in res.items()},
        "throughput_img_per_s": {k: round(batch / v / steps, 3) for k, v in res.items()},
        "c_over_b": round(res["c_mixed"] / res["b_fused"], 3),
        "c_union_over_b": round(res["c_union"] / res["b_fused"], 3),
        "d_over_c": round(res["d_peft"] / res["c_mixed"], 2),
        "d_fuse_over_c": round(res["d_peft_fuse"] / res["c_mixed"], 2),
        "max_abs_diff_c_vs_b": float((mixed_out - fused_out).abs().max()),
        "max_abs_diff_c_vs_peft": float((mixed_out - peft_out).abs().max()),
        "max_abs_diff_union_vs_b": float((union_out - fused_out).abs().max()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="16x16 latents, fewer repeats: < 5 min on 2 cores")
    p.add_argument("--batch", type=int, default=8, help="requests per batch (the UNet sees twice as many)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps a request runs (amortises peft's switch)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 because on a loaded 2-core machine 2 threads stall each other (10x)")
    p.add_argument("--latent", type=int, help="latent side of the SD1.5-shaped runs (default 32; --quick 16)")
    add_device_args(p)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    latent, rounds = (16, 3) if args.quick else (32, 7)
    latent = args.latent or latent
    where = {"device": args.device, "dtype": DTYPES[args.dtype]}
    runs = [bench_model("tiny", load_base("tiny", **where), 16, args.batch, args.steps, rounds * 5),
            bench_model("sd15-shaped", sd15_base(**where), latent, args.batch, args.steps, rounds)]
    emit({"benchmark": "serve", "adapter": {"rank": ADAPTER.rank, "num_slots": ADAPTER.num_slots},
          "live_concepts": LIVE, "concepts_per_request": 2, "quick": args.quick,
          "env": environment(args.device, DTYPES[args.dtype]), "runs": runs})


if __name__ == "__main__":
    main()
