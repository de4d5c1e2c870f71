"""Is a concept recognisable alone and kept when merged? Checked on toy identities nobody here drew.

The product's promise in numbers: random toy identities (a seed outside every benchmark stream) are
trained through `python -m blocklora train`, one slot each, and drawn the way `python -m blocklora
generate` draws (LiveMerge of the artifacts, then the pipeline), scored by the identity judge
against fresh reference pictures:

- base: the bare base on the class prompt ("a large circle on a red background");
- drawn, VAE round trip: fresh drawn pictures of the concept as that prompt asks for it, encoded and
  decoded by the base's VAE: what a perfectly learned concept would score, so "alone" reads against it;
- alone: the concept's prompt ("a large {name} on a red background") with it merged alone;
- Eq. 5 / sum at N: merged with the next N - 1 concepts of the list (rotating windows, so every
  concept is scored at every N), α = 1/N (the paper's Eq. 5) and α = 1;
- alone at 1/N (--diluted): the concept alone at Eq. 5's weight, so the loss under Eq. 5 splits into
  dilution and neighbours.

Prints JSON (per condition: mean IA with a bootstrap interval over concepts x seeds; alone − base,
its share of the attainable gain (drawn − base) and merged / alone paired; every (concept, seed)
score, so that `benchmarks.identity_compare` can pair two runs) and writes result.json and
contact_sheet.png under --out.

    python -m benchmarks.identity_check --base models/toy-base --count 3 --ns 3 --out DIR
    python -m benchmarks.identity_check --named ember frost lagoon --ns 3 --out DIR   # the main job's three
    python -m benchmarks.identity_check --quick --out DIR     # CI: tiny base, 2 steps (structure only)
    python -m benchmarks.identity_compare DIR_A DIR_B          # paired: what a change did, same identities
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import emit, environment
from benchmarks.stats import mean, mean_diff, mean_ratio, paired_bootstrap
from blocklora.config import AdapterConfig, TrainConfig, add_flags, from_args, to_argv
from blocklora.toy.recipe import TOY_BASE_ADAPTER, TOY_BASE_GENERATE, TOY_BASE_TRAIN

IDENTITY_SEED = 20261207  # outside every benchmark's and the judge's identity streams
BASE, ALONE, DRAWN = "base on class prompt", "alone", "drawn, VAE round trip"  # what other conditions read against


def share_of_attainable(alone: np.ndarray, base: np.ndarray, drawn: np.ndarray) -> float | np.ndarray:
    """(alone − base) / (drawn − base) over the last two axes: how much of what a perfect concept would
    add over the bare base this one adds."""
    return mean_diff(alone, base) / mean_diff(drawn, base)


def train_all(concepts, base: str, adapter: AdapterConfig, train: TrainConfig, work: Path) -> list[Path]:
    """One `python -m blocklora train` per concept, slot = its index mod K; kept if trained with the same flags."""
    from blocklora.toy.concepts import write_concept_folder

    flags = [*to_argv(train), *to_argv(adapter)]
    paths = []
    for k, c in enumerate(concepts):
        folder, art = write_concept_folder(c, work / "pictures" / c.name), work / "concepts" / f"{c.name}.safetensors"
        stamp = art.with_suffix(".flags.json")
        cmd = [sys.executable, "-m", "blocklora", "train", "--base", base, "--images", str(folder), "--name", c.name,
               "--class-word", c.class_word, "--slot", str(k % adapter.num_slots), "--out", str(art), *flags]
        if not (art.exists() and stamp.exists() and json.loads(stamp.read_text()) == cmd[2:]):
            t0 = time.time()
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
            if done.returncode:
                raise RuntimeError(f"training {c.name} failed:\n{done.stderr[-3000:]}")
            stamp.write_text(json.dumps(cmd[2:]))
            print(f"trained {c.name} ({c.class_word}, slot {k % adapter.num_slots}) in {time.time() - t0:.0f} s",
                  flush=True)
        paths.append(art)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="models/toy-base")
    ap.add_argument("--count", type=int, default=3, help="random identities trained")
    ap.add_argument("--identity-seed", type=int, default=IDENTITY_SEED)
    ap.add_argument("--named", nargs="+", default=None, metavar="NAME",
                    help="these concepts of blocklora.toy.concepts.CONCEPTS instead of --count random identities "
                         "(e.g. the main job's: ember frost lagoon)")
    ap.add_argument("--ns", type=int, nargs="+", default=[3], help="merge sizes N scored (≤ the concepts scored)")
    ap.add_argument("--diluted", type=int, nargs="*", default=[],
                    help="also score each concept alone at α = 1/N for these N: what Eq. 5 costs without neighbours")
    ap.add_argument("--seeds", type=int, default=4, help="sampling seeds per prompt")
    ap.add_argument("--guidance", type=float, default=TOY_BASE_GENERATE.guidance_scale)
    ap.add_argument("--steps-sample", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="CI: the tiny base, 2 concepts, 2 training and 2 sampling "
                                                         "steps, 1 seed (structure only)")
    add_flags(ap, TrainConfig, TOY_BASE_TRAIN)  # the main job's recipe unless a flag says otherwise
    add_flags(ap, AdapterConfig, TOY_BASE_ADAPTER)
    args = ap.parse_args()
    if args.quick:
        args.base, args.count, args.ns, args.diluted, args.seeds, args.steps_sample = "tiny", 2, [2], [2], 1, 2
    torch.set_num_threads(args.threads)
    train = from_args(TrainConfig, args, ap, **({"steps": 2, "num_class_images": 1} if args.quick else {}))
    adapter = from_args(AdapterConfig, args, ap)

    from blocklora.config import GenerateConfig
    from blocklora.method.artifact import ConceptArtifact
    from blocklora.method.merge import LiveMerge
    from blocklora.pipeline.base import load_base
    from blocklora.pipeline.generate import contact_sheet, generate, vae_roundtrip
    from blocklora.pipeline.prompts import expand
    from blocklora.toy.concepts import (
        CONCEPTS,
        class_prompt,
        drawn_pictures,
        eval_attributes,
        instance_prompt,
        reference_pictures,
        training_pictures,
    )
    from blocklora.toy.identity import load_identity_judge, random_identities

    if args.named:
        known = {c.name: c for c in CONCEPTS}
        unknown = [n for n in args.named if n not in known]
        if unknown:
            ap.error(f"--named: no concept(s) {unknown} in blocklora.toy.concepts.CONCEPTS ({', '.join(known)})")
        concepts = [known[n] for n in args.named]
    else:
        concepts = random_identities(args.count, args.identity_seed)
    if max(args.ns) > len(concepts):
        ap.error(f"--ns up to {max(args.ns)}: larger than the {len(concepts)} concepts scored")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    arts = [ConceptArtifact.load(p) for p in train_all(concepts, args.base, adapter, train, args.out)]
    train_s = time.time() - t0
    base, judge = load_base(args.base), load_identity_judge()
    gen = GenerateConfig(steps=args.steps_sample, guidance_scale=args.guidance, seed=0)
    merge = LiveMerge(base, adapter)
    ia: dict[str, np.ndarray] = {}
    pictures: dict[str, list] = {}

    def score(cond: str, i: int, prompt: str, images: list) -> None:
        refs = reference_pictures(concepts[i], 8, seed=0)
        ia.setdefault(cond, np.zeros((len(concepts), args.seeds)))[i] = judge.image_alignment(images, refs).numpy()
        pictures.setdefault(cond, []).append(images)

    for i, c in enumerate(concepts):
        attrs = eval_attributes(c, 1)[0]
        merge.set([])
        plain = class_prompt(c, attrs)
        score(BASE, i, plain, generate(base, plain, gen, args.seeds))
        score(DRAWN, i, plain, vae_roundtrip(base, drawn_pictures(c, attrs, args.seeds)))
        conds = [(ALONE, [i], None), ("token only", [i], [0.0])]
        conds += [(f"alone at 1/{n}", [i], [1 / n]) for n in args.diluted]
        for n in args.ns:
            group = [(i + j) % len(concepts) for j in range(n)]
            conds += [(f"Eq. 5, N = {n}", group, "mean"), (f"sum, N = {n}", group, None)]
        for cond, group, rule in conds:
            merge.set([arts[j] for j in group], rule)
            prompt = expand(instance_prompt(c, attrs), merge.phrases())
            score(cond, i, prompt, generate(base, prompt, gen, args.seeds))
        n = max(args.ns)
        merge.set([arts[(i + j) % len(concepts)] for j in range(n)], "mean")
        score(f"class prompt, Eq. 5 N = {n}", i, plain, generate(base, plain, gen, args.seeds))
        print(f"scored {c.name}: " + ", ".join(f"{k} {v[i].mean():.3f}" for k, v in ia.items()), flush=True)

    alone = ia[ALONE]
    result = {"benchmark": "identity_check", "quick": args.quick, "env": environment("cpu", torch.float32),
              "base": args.base, "identities": [c.__dict__ for c in concepts], "train": to_argv(train),
              "adapter": to_argv(adapter), "seeds": args.seeds, "guidance": args.guidance,
              "train_seconds": train_s, "conditions": {}}
    for cond, x in ia.items():
        ci = paired_bootstrap([x], mean)
        row = {"ia": ci.estimate, "ci": [ci.low, ci.high], "per_concept": x.mean(1).round(4).tolist(),
               "per_seed": x.round(4).tolist()}
        if cond in (ALONE, DRAWN):
            gain = paired_bootstrap([x, ia[BASE]], mean_diff)
            row["gain_over_base"], row["gain_ci"] = gain.estimate, [gain.low, gain.high]
        if cond == ALONE:
            share = paired_bootstrap([x, ia[BASE], ia[DRAWN]], share_of_attainable)
            row["share_of_attainable"], row["share_ci"] = share.estimate, [share.low, share.high]
        elif cond not in (BASE, DRAWN):
            kept = paired_bootstrap([x, alone], mean_ratio, seed=1)
            row["kept"], row["kept_ci"] = kept.estimate, [kept.low, kept.high]
        result["conditions"][cond] = row
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    rows = [("training pictures", [im for c in concepts[:6] for im in training_pictures(c)[:1]])]
    rows += [(cond, [imgs[0] for imgs in pics[:6]]) for cond, pics in pictures.items()]
    contact_sheet(rows, cell=96).save(args.out / "contact_sheet.png")
    emit(result)


if __name__ == "__main__":
    main()
