"""Mixed-precision training against float32: same seed, same steps; the loss each reaches, the step time.

    python -m benchmarks.mixed_precision --device cuda                 # SD1.5 shapes, bf16 (~1 min on a GPU)
    python -m benchmarks.mixed_precision --model tiny --steps 200      # the tiny base (CPU: a few minutes)
    python -m benchmarks.mixed_precision --quick                       # tiny base, 20 steps (structure check)

Arm "no" trains on a float32 base; arm "bf16" (or "fp16" with --dtype float16, CUDA only) on the
same base cast to the half dtype, with A, the owned B rows, the trigger embeddings and AdamW's state
in float32 and the forward under autocast (TrainConfig.mixed_precision). Both run the same
`ConceptTrainer` steps on the same images with the same seed. The arms take their steps in turn, so
a loaded machine slows both alike, and each arm's global RNG state (erasure masks draw from it) is
restored around its own steps: the mixed arm sees exactly the float32 arm's batches, noise,
timesteps, flips and masks. Reported: the mean loss of the last k steps of each arm and their ratio
(#14's target: within 2%), the largest per-step loss gap, how far the trained B rows drifted apart,
and the median step times with their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS_DIR, add_device_args, emit, environment, line_plot, sd15_base, timed
from blocklora.config import AdapterConfig
from blocklora.pipeline.base import Base, load_base
from blocklora.pipeline.precision import DTYPES, MIXED
from blocklora.toy.recipe import TOY_BASE_TRAIN
from blocklora.training.trainer import ConceptTrainer

TARGET = 0.02  # #14: the mixed arm's final loss within 2% of float32's


def make_base(model: str, device: str, dtype: torch.dtype) -> Base:
    return load_base("tiny", device=device, dtype=dtype) if model == "tiny" else sd15_base(device=device, dtype=dtype)


def smooth_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """Seeded pictures with structure at several scales (upsampled noise), in [-1, 1]: (count, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(count, 3, 4, 4, generator=g), size=size, mode="bilinear")
    fine = F.interpolate(torch.rand(count, 3, 16, 16, generator=g), size=size, mode="bilinear")
    return (0.7 * coarse + 0.3 * fine) * 2 - 1


class Arm:
    """One trainer and the global RNG state it owns between its steps."""

    def __init__(self, mixed: str, model: str, device: str, adapter: AdapterConfig, train_steps: int,
                 batch: int, image_size: int) -> None:
        self.mixed, self.device = mixed, device
        half = MIXED[mixed]
        self.base = make_base(model, device, half or torch.float32)
        train = dataclasses.replace(TOY_BASE_TRAIN, steps=train_steps, batch_size=batch, resolution=image_size,
                                    seed=0, mixed_precision=mixed, quiet_weight=0.0)  # no class pictures here
        self.trainer = ConceptTrainer(self.base, adapter, train, slot=0, name="bench", class_word="dog")
        self.rng = self._rng()  # as ConceptTrainer seeded it
        self.losses: list[float] = []
        self.times: list[float] = []

    def _rng(self) -> tuple:
        cuda = torch.cuda.get_rng_state(self.device) if torch.device(self.device).type == "cuda" else None
        return torch.get_rng_state(), cuda

    def step(self, images: torch.Tensor, captions: list[str | None]) -> None:
        cpu, cuda = self.rng
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)
        box: list[float] = []
        self.times.append(timed(lambda: box.append(self.trainer.next_step(images, captions)), self.device))
        self.losses.append(box[0])
        self.rng = self._rng()

    def lora_b(self) -> torch.Tensor:
        return torch.cat([layer.lora_B.detach().float().flatten().cpu() for layer in self.trainer.layers.values()])


def run(model: str, steps: int, last: int, batch: int, image_size: int, mixed: str, device: str, out: Path) -> dict:
    adapter = AdapterConfig(rank=4, num_slots=16)
    images = smooth_images(8, image_size)
    captions: list[str | None] = [None] * images.shape[0]
    arms = [Arm(m, model, device, adapter, steps, batch, image_size) for m in ("no", mixed)]
    try:
        t0 = time.perf_counter()
        for k in range(1, steps + 1):
            for arm in arms:
                arm.step(images, captions)
            if k % 10 == 0 or k == steps:  # stderr: stdout's last line is the JSON
                eta = (time.perf_counter() - t0) / k * (steps - k)
                losses = "  ".join(f"{a.mixed} {a.losses[-1]:.4f}" for a in arms)
                print(f"[mixed_precision] step {k}/{steps}  loss {losses}  ETA {eta:.0f} s", file=sys.stderr,
                      flush=True)
        ref, half = arms
        final = {a.mixed: statistics.fmean(a.losses[-last:]) for a in arms}
        rows = {a.mixed: {"final_loss": final[a.mixed], "first_loss": a.losses[0],
                          "step_s_median": statistics.median(a.times[1:]),  # the first step carries warm-up
                          "losses": a.losses} for a in arms}
        gaps = [abs(h - r) / r for h, r in zip(half.losses, ref.losses)]
        b_ref, b_half = ref.lora_b(), half.lora_b()
        loss_ratio = final[mixed] / final["no"]
    finally:
        for arm in arms:
            arm.trainer.close()
    line_plot(out / "mixed_precision_loss.png", {f"mixed_precision={a}": (list(range(1, steps + 1)), r["losses"])
                                                 for a, r in rows.items()},
              "step", "loss", f"{model}: float32 vs {mixed} mixed precision, same seed")
    return {"benchmark": "mixed_precision", "env": environment(device, MIXED[mixed]), "model": model,
            "steps": steps, "last_k": last, "batch": batch, "image_size": image_size, "mixed_precision": mixed,
            "arms": rows, "loss_ratio": loss_ratio, "loss_within_target": abs(loss_ratio - 1) <= TARGET,
            "target": TARGET, "max_step_loss_rel_gap": max(gaps), "median_step_loss_rel_gap": statistics.median(gaps),
            "lora_b_rel_diff": float((b_half - b_ref).norm() / b_ref.norm()),
            "step_time_ratio": rows[mixed]["step_s_median"] / rows["no"]["step_s_median"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(p)
    p.set_defaults(dtype="bfloat16")  # here --dtype is the mixed arm's half dtype
    p.add_argument("--model", choices=("tiny", "sd15"), default="sd15", help="the tiny base or SD1.5 shapes")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per arm")
    p.add_argument("--last", type=int, default=10, help="the final loss is the mean of the last k steps")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--image-size", type=int, default=64, help="pixels (latent = size / the VAE's factor 2)")
    p.add_argument("--quick", action="store_true", help="tiny base, 20 steps, last 5")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "mixed_precision", help="folder for the loss plot")
    args = p.parse_args()
    if args.dtype == "float32":
        p.error("--dtype names the mixed arm's half dtype: bfloat16 or float16 (the other arm is float32)")
    torch.set_num_threads(args.threads)
    if args.quick:
        args.model, args.steps, args.last, args.image_size = "tiny", 20, 5, 32
    mixed = {v: k for k, v in MIXED.items()}[DTYPES[args.dtype]]
    result = run(args.model, args.steps, args.last, args.batch, args.image_size, mixed, args.device, args.out)
    result["quick"] = args.quick
    emit(result)


if __name__ == "__main__":
    main()
