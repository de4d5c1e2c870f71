"""Two toy bases side by side on the same prompts and seeds: does the second draw its shapes better?

    python -m benchmarks.base_compare --bases models/toy-base /tmp/new-base --out docs/results/base-compare
    python -m benchmarks.base_compare --quick --bases models/toy-base models/toy-base   # CI: structure only

Each base draws "a large {colour} {shape}" for the card's twelve (shape, colour) pairs (the six held out
of training and six seen ones, every shape twice) with the same sampling seeds and the card's sampler,
and the shape/colour judge (`blocklora.toy.judge`) reads each picture. Reported per base: shape and
colour accuracy, per shape; and for every base after the first, the paired difference to the first
with a bootstrap 95% interval over (pair, seed) cells — the same prompt and noise on both sides.
Writes result.json and compare.png (seed 0 of every pair, one row per base).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from benchmarks.common import emit, environment
from benchmarks.stats import mean_diff, paired_bootstrap
from blocklora.pipeline.base import load_base
from blocklora.toy.base import SAMPLE_STEPS, TOY_BASE_DIR, draw
from blocklora.toy.draw import SIZE
from blocklora.toy.judge import SCORED_HELDOUT, SCORED_SEEN, load_judge
from blocklora.toy.vocabulary import SHAPES

PAIRS = SCORED_HELDOUT + SCORED_SEEN  # the model card's pairs


def judged(folder: str, seeds: list[int], steps: int) -> tuple[np.ndarray, np.ndarray, list[Image.Image]]:
    """(pairs, seeds) 0/1 arrays of a correct shape and a correct colour, and the pictures, pair-major."""
    pipe = load_base(folder, device="cpu").pipe
    images = draw(pipe, [(f"a large {c} {s}", seed) for s, c in PAIRS for seed in seeds], steps)
    got = np.array(load_judge().classify(images)).reshape(len(PAIRS), len(seeds), 2)
    want = np.array(PAIRS)[:, None, :]
    return (got[..., 0] == want[..., 0]).astype(float), (got[..., 1] == want[..., 1]).astype(float), images


def strip(rows: list[tuple[str, list[Image.Image]]], png: Path) -> None:
    """One row per base: its first-seed picture of every pair, labelled."""
    top = 12
    sheet = Image.new("RGB", (len(PAIRS) * (SIZE + 2), top + len(rows) * (SIZE + top)), "white")
    d = ImageDraw.Draw(sheet)
    for j, (s, c) in enumerate(PAIRS):
        d.text((j * (SIZE + 2) + 1, 0), f"{c[:3]} {s[:4]}", fill="black")
    for i, (name, pics) in enumerate(rows):
        y = top + i * (SIZE + top)
        for j, pic in enumerate(pics):
            sheet.paste(pic, (j * (SIZE + 2), y))
        d.text((2, y + SIZE), name[-60:], fill="black")
    sheet.save(png)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bases", nargs="+", default=[str(TOY_BASE_DIR)],
                   help="diffusers folders; the first is the reference")
    p.add_argument("--seeds", type=int, default=16, help="sampling seeds per (shape, colour) pair")
    p.add_argument("--steps", type=int, default=SAMPLE_STEPS, help="DDIM steps (the card's sampler)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="folder for result.json and compare.png")
    p.add_argument("--quick", action="store_true", help="CI: 2 seeds, 2 DDIM steps (structure only)")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps = 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    scored = {b: judged(b, seeds, args.steps) for b in args.bases}
    ref_shape, ref_colour, _ = scored[args.bases[0]]
    bases = {}
    for b, (shape, colour, _) in scored.items():
        row = {"shape": float(shape.mean()), "colour": float(colour.mean()),
               "shape_by_class": {s: float(shape[[k for k, (ps, _) in enumerate(PAIRS) if ps == s]].mean())
                                  for s in SHAPES}}
        if b != args.bases[0]:
            for what, ours, ref in (("shape", shape, ref_shape), ("colour", colour, ref_colour)):
                iv = paired_bootstrap([ours, ref], mean_diff)
                row[f"{what}_minus_first"] = [float(iv.estimate), float(iv.low), float(iv.high)]
        bases[b] = row
    result = {"benchmark": "base_compare", "quick": args.quick, "env": environment("cpu", torch.float32),
              "pairs": PAIRS, "seeds": args.seeds, "steps": args.steps, "bases": bases,
              "seconds": time.perf_counter() - t0}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(result, indent=1))
        strip([(b, pics[:: len(seeds)]) for b, (_, _, pics) in scored.items()], args.out / "compare.png")
    emit(result)


if __name__ == "__main__":
    main()
