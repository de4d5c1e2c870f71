"""Training cost: one BlockLoRA client step vs one peft LoRA step, and the upload per concept.

    python -m benchmarks.train_bench            # tiny base and SD1.5 shapes, rank 4 (~5 min)
    python -m benchmarks.train_bench --quick    # fewer timed steps (< 3 min)
    python -m benchmarks.train_bench --device cuda --mixed-precision bf16   # bf16 base, fp32 adapters, autocast
    python -m benchmarks.train_bench --erasure 0 --floor   # like for like with peft (no erasure), and the floor

Both arms run the very same `ConceptTrainer.step` (flip, VAE encode, prompt encode with the
trainable trigger embedding, UNet, MSE, backward, AdamW): for the peft arm the BlockLoRA layers
are ejected and peft's LoRA (same target modules, same rank) takes their place in the UNet and
the optimizer. Only the adapter differs, so the difference in time and memory is the adapter's.
BlockLoRA trains with its randomized output erasure (`--erasure`, the config's default); peft's
LoRA has none (lora_dropout 0). `--floor` adds a third arm with no UNet adapter at all (only the
trigger embedding is trained): the step that any adapter's step can at best approach.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save as safetensors_bytes

from benchmarks import common
from blocklora.config import AdapterConfig, TrainConfig, add_flags, from_args
from blocklora.method.inject import eject
from blocklora.pipeline.base import Base, load_base
from blocklora.pipeline.precision import base_dtype
from blocklora.training.trainer import ConceptTrainer

ARMS = ("blocklora", "peft-lora")
FLOOR = "no-adapter"
PEFT_ADAPTER = "bench"


def make_trainer(base: Base, arm: str, adapter: AdapterConfig, train: TrainConfig) -> ConceptTrainer:
    """A trainer for slot 0 whose UNet adapter is BlockLoRA or, for "peft-lora", peft's LoRA
    (for FLOOR: none, only the trigger embedding is trained)."""
    trainer = ConceptTrainer(base, adapter, train, slot=0, name="bench", class_word="dog")
    if arm == FLOOR:
        eject(base.pipe)
        trainer.opt = torch.optim.AdamW([t.vectors for t in trainer.tokens.values()], lr=train.token_lr,
                                        weight_decay=0.0)
    if arm == "peft-lora":
        eject(base.pipe)
        base.pipe.unet.add_adapter(LoraConfig(r=adapter.rank, lora_alpha=adapter.rank,
                                              target_modules=list(adapter.unet_targets)), PEFT_ADAPTER)
        lora = [p for n, p in base.pipe.unet.named_parameters() if ".lora_" in n]
        if train.mixed_precision != "no":
            for p in lora:  # as BlockLoRA's: float32 beside the half-precision base
                p.data = p.data.float()
        groups = [{"params": lora, "lr": train.lr},
                  {"params": [t.vectors for t in trainer.tokens.values()], "lr": train.token_lr}]
        trainer.opt = torch.optim.AdamW(groups, weight_decay=0.0)
    return trainer


def upload_bytes(base: Base, arm: str, trainer: ConceptTrainer) -> int:
    """What a client sends: the artifact for BlockLoRA; for peft, the LoRA file diffusers writes
    (A and the full B of every target, safetensors) — without any trigger embedding."""
    if arm == "blocklora":
        return len(trainer.artifact().to_bytes())
    if arm == FLOOR:
        return 0
    state = get_peft_model_state_dict(base.pipe.unet, adapter_name=PEFT_ADAPTER)
    return len(safetensors_bytes({k: v.contiguous() for k, v in state.items()}))


def close(base: Base, arm: str, trainer: ConceptTrainer) -> None:
    if arm == "peft-lora":
        base.pipe.unet.unload_lora()
    trainer.close()


def measure_arm(base: Base, arm: str, adapter: AdapterConfig, train: TrainConfig, images: torch.Tensor,
                warmup: int, steps: int, profile_to: Path | None = None) -> dict:
    """One arm's step times and memory; with `profile_to`, one more step under torch.profiler
    whose table of operators (by self CPU time) is written there."""
    trainer = make_trainer(base, arm, adapter, train)
    try:
        captions: list[str | None] = [None] * images.shape[0]
        trainable = [p for g in trainer.opt.param_groups for p in g["params"]]
        for _ in range(warmup):
            trainer.step(images, captions)
        frozen = [p for p in base.pipe.unet.parameters() if not p.requires_grad]
        frozen += [p for te in base.text_encoders.values() for p in te.parameters() if not p.requires_grad]
        activations = common.saved_activation_bytes(lambda: trainer.step(images, captions), frozen)
        with common.peak_rss() as mem:
            times = [timed_cpu(lambda: trainer.step(images, captions)) for _ in range(steps)]
        if profile_to is not None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if base.pipe.device.type == "cuda":  # the kernels' own time beside their launches'
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                trainer.step(images, captions)
            profile_to.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        n_train = sum(p.numel() for p in trainable)
        return {"arm": arm, "step_times": [t[0] for t in times], "step_cpu_times": [t[1] for t in times],
                "trainable_params": n_train,
                "adapter_params": n_train - sum(t.vectors.numel() for t in trainer.tokens.values()),
                "activation_bytes": activations,
                "optimizer_state_bytes": 3 * sum(p.nbytes for p in trainable),  # grad + 2 Adam moments
                "peak_rss_extra_bytes": mem["extra"], "upload_bytes": upload_bytes(base, arm, trainer)}
    finally:
        close(base, arm, trainer)


def timed_cpu(fn: Callable[[], object], device: torch.device | str | None = None) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call: with one torch thread the CPU time
    leaves out the waits a loaded shared machine adds to the wall clock."""
    cpu = time.process_time()
    wall = common.timed(fn, device)
    return wall, time.process_time() - cpu


def bench_model(name: str, base: Base, rank: int, batch: int, image_size: int, rounds: int,
                steps: int, mixed_precision: str = "no", erasure: float = AdapterConfig.erasure,
                arms: tuple[str, ...] = ARMS, profile_dir: Path | None = None) -> list[dict]:
    """Alternate the arms `rounds` times, rotating their order, so a noisy neighbour or a drift
    within a round slows all alike; medians of all steps."""
    adapter = AdapterConfig(rank=rank, text_targets=(), erasure=erasure)
    train = TrainConfig(batch_size=batch, resolution=image_size, seed=0, mixed_precision=mixed_precision)
    images = torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for i in range(rounds):
        for arm in arms[i % len(arms):] + arms[:i % len(arms)]:  # each arm leads in turn: no arm always first
            prof = None if profile_dir is None else profile_dir / f"profile-{name}-{arm}.txt"
            runs[arm].append(measure_arm(base, arm, adapter, train, images, warmup=1, steps=steps, profile_to=prof))
    rows = []
    for arm, rs in runs.items():
        times = [t for r in rs for t in r.pop("step_times")]
        cpu = [t for r in rs for t in r.pop("step_cpu_times")]
        rows.append({"model": name, "arm": arm, "rank": rank, "batch": batch, "erasure": erasure,
                     "latent": image_size // base.pipe.vae_scale_factor, "step_s_median": statistics.median(times),
                     "step_s_min": min(times), "step_cpu_s_median": statistics.median(cpu),
                     "timed_steps": len(times),
                     "round_medians_s": [statistics.median(r) for r in _rounds(times, rounds)],
                     "round_cpu_medians_s": [statistics.median(r) for r in _rounds(cpu, rounds)],
                     **{k: v for k, v in rs[0].items() if k != "arm"},
                     "peak_rss_extra_bytes": max(r["peak_rss_extra_bytes"] for r in rs)})
    return rows


def _rounds(times: list[float], rounds: int) -> list[list[float]]:
    """All steps of one arm, in order, cut back into its rounds."""
    per = len(times) // rounds
    return [times[i * per:(i + 1) * per] for i in range(rounds)]


def _compare(ours: dict, theirs: dict) -> dict:
    """Ratios of two arms of one model (< 1: `ours` faster); per round too, since the arms of one
    round ran back to back under much the same load of the shared machine."""
    wall, cpu = ([a / b for a, b in zip(ours[key], theirs[key])] for key in ("round_medians_s", "round_cpu_medians_s"))
    return {"step_time_ratio": ours["step_s_median"] / theirs["step_s_median"],
            "step_cpu_ratio": ours["step_cpu_s_median"] / theirs["step_cpu_s_median"],
            "round_ratios": wall, "round_ratio_range": [min(wall), max(wall)],
            "round_cpu_ratios": cpu, "round_cpu_ratio_range": [min(cpu), max(cpu)]}


def run(rounds: int, steps: int, rank: int, out: Path, device: str = "cpu",
        dtype: torch.dtype = torch.float32, mixed_precision: str = "no",
        erasure: float = AdapterConfig.erasure, floor: bool = False, profile: bool = False,
        sd15_size: int = 32) -> dict:
    """`dtype` is the whole base's, adapters included; with `mixed_precision` (then dtype is that
    half dtype) the adapters of both arms are float32 and the step runs under autocast.
    `sd15_size`: the SD1.5-shaped model's image size. Its VAE is the tiny one (÷2), so the default
    32 is a 16 x 16 latent, which fits a CPU; 128 is SD1.5's own 64 x 64 latent (512 px through
    SD1.5's VAE), where a GPU's step is the kernels' work rather than their launches."""
    arms = ARMS + ((FLOOR,) if floor else ())
    out.mkdir(parents=True, exist_ok=True)
    shared = dict(rounds=rounds, mixed_precision=mixed_precision, erasure=erasure, arms=arms,
                  profile_dir=out if profile else None)
    rows = bench_model("tiny", load_base("tiny", device=device, dtype=dtype), rank, batch=2, image_size=32,
                       steps=steps, **shared)
    rows += bench_model("sd15-shaped", common.sd15_base(device=device, dtype=dtype), rank, batch=1,
                        image_size=sd15_size, steps=max(2, steps // 3), **shared)
    common.write_csv(out / "train_cost.csv", rows)
    get = {(r["model"], r["arm"]): r for r in rows}
    summary = {}
    for model in ("tiny", "sd15-shaped"):
        ours, theirs = get[model, "blocklora"], get[model, "peft-lora"]
        summary[model] = {
            **_compare(ours, theirs),
            "adapter_param_ratio": ours["adapter_params"] / theirs["adapter_params"],
            "activation_bytes_ratio": ours["activation_bytes"] / theirs["activation_bytes"],
            "upload_bytes_ratio": ours["upload_bytes"] / theirs["upload_bytes"],
        }
        if floor:  # the best ratio any adapter could reach: the step without one, over peft's
            summary[model]["floor_vs_peft"] = _compare(get[model, FLOOR], theirs)
    series = {arm: (["tiny", "sd15-shaped"], [get[m, arm]["step_s_median"] for m in ("tiny", "sd15-shaped")])
              for arm in arms}
    common.line_plot(out / "train_step.png", series, "model", "seconds per step (median)",
              f"one training step, rank {rank}", logy=True)
    return {"benchmark": "train", "env": common.environment(device, dtype), "mixed_precision": mixed_precision,
            "rank": rank, "erasure": erasure, "rounds": rounds, "sd15_size": sd15_size,
            "summary": summary, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds and timed steps")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "train", help="folder for CSV and PNG")
    common.add_device_args(p)
    add_flags(p, TrainConfig, only=("mixed_precision",))
    add_flags(p, AdapterConfig, only=("erasure",))
    p.add_argument("--rounds", type=int, help="times the arms alternate (default: 3, --quick 1)")
    p.add_argument("--floor", action="store_true", help="add the arm without any UNet adapter")
    p.add_argument("--profile", action="store_true",
                   help="profile one more step per arm (torch.profiler): OUT/profile-MODEL-ARM.txt")
    p.add_argument("--sd15-size", type=int, default=32,
                   help="image size of the SD1.5-shaped model, whose tiny VAE halves it: 32 -> a 16 x 16 "
                        "latent; 128 -> SD1.5's own 64 x 64 (for a GPU)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 by default: on a shared machine, idle-waiting OpenMP threads "
                        "of an oversubscribed CPU make small ops erratic")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rounds, steps = (1, 3) if args.quick else (3, 10)
    rounds = args.rounds or rounds
    mixed = from_args(TrainConfig, args, p).mixed_precision
    if mixed != "no" and args.dtype != "float32":
        p.error(f"--mixed-precision {mixed} sets the base's dtype ({base_dtype(mixed)}); leave --dtype out")
    dtype = base_dtype(mixed) if mixed != "no" else common.DTYPES[args.dtype]
    erasure = from_args(AdapterConfig, args, p).erasure
    result = run(rounds, steps, args.rank, args.out, args.device, dtype, mixed, erasure, args.floor,
                 args.profile, args.sd15_size)
    result["quick"] = args.quick
    common.emit(result)


if __name__ == "__main__":
    main()
