"""Merge rules beside Eq. 5 on one trained BlockLoRA set: is there a merge that keeps more of a
concept at N = 15 than α = 1/N does, while staying instant and exact?

    python -m benchmarks.merge_rules --profile recipe --rank 4   # the retention benchmark's recipe set, ~25 CPU-min
    python -m benchmarks.merge_rules --quick                     # CI: 2 concepts, 2 steps (structure only)

At α = 1/N a merged concept keeps about its trigger token (docs/results/retention.md); at α = 1 the others'
rows wreck it. Two ways between, each scored for concept r in the window S of N concepts that
`benchmarks.retention.eval` uses (same concepts, prompts, sampling seeds, paired cell by cell):
- **α between 1/N and 1** for every member (2/N, 1/√N, 1/2): where the trade between keeping r's own
  weights and letting the others' in has its best;
- **trigger-gated cross-attention k/v**: each concept's key/value residual acts only on its own trigger
  tokens. On a prompt with one trigger that is exactly r's own k/v at full strength and none of the
  others', so it is scored as that residual (with α = 1/N or α = 1 on the other layers); a class prompt
  holds no trigger, so it gets no k/v residual at all (its drift is scored too).
The trainings come from the retention benchmark's cache (trained there if missing: same keys).
Writes docs/results/merge-rules/{result.json, tables.md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.baselines import merge_deltas, residual_applied
from benchmarks.common import RESULTS_DIR, emit, environment
from benchmarks.retention.eval import EvalConfig, group_of, phrase, sample, window
from benchmarks.retention.report import ci, md_table
from benchmarks.retention.study import PROFILES, Progress, Trainings, add_study_args, study_configs, variants
from benchmarks.retention.world import load_world
from benchmarks.stats import mean_diff, paired_bootstrap
from blocklora.config import AdapterConfig, TrainConfig
from blocklora.pipeline.base import load_base
from blocklora.toy.recipe import default_base_spec

REFERENCE = "α = 1/N (Eq. 5)"


def alphas(n: int) -> dict[str, float]:
    return {REFERENCE: 1 / n, "α = 2/N": 2 / n, "α = 1/√N": n ** -0.5, "α = 1/2": 0.5, "α = 1 (sum)": 1.0}


def is_kv(key: str) -> bool:
    return group_of(key) == "cross-attn k/v"


ALONE = ("alone (N = 1)", "trigger token only")  # rules with only concept r's trigger rows written


def rules(own: dict, total: dict, n: int) -> dict[str, dict]:
    """Rule -> the residual concept r's prompts are sampled under; `own` is r's residual alone,
    `total` the window's sum (α = 1)."""
    out = {ALONE[0]: own, ALONE[1]: {}}
    out |= {name: {k: a * v for k, v in total.items()} for name, a in alphas(n).items()}
    for name, a in (("gated k/v + 1/N elsewhere", 1 / n), ("gated k/v + sum elsewhere", 1.0)):
        out[name] = {k: own[k] if is_kv(k) else a * v for k, v in total.items()}
    return out


def run(profile_name: str, base_spec: str, train: TrainConfig, study: AdapterConfig, arm: str, cache: Path,
        out: Path) -> dict:
    profile = PROFILES[profile_name]
    base = load_base(base_spec, device="cpu")
    train = dataclasses.replace(train, resolution=base.resolution, steps=profile.steps, batch_size=profile.batch)
    v = variants(study, train, (arm,))[arm]
    world = load_world()
    m, n = profile.concepts, profile.ns[-1]
    cfg = EvalConfig(ns=(1, n), seeds=profile.seeds, steps=profile.gen_steps)
    seeds, s = list(cfg.seeds), len(cfg.seeds)
    progress = Progress({"training": m, "concept": m})
    arts = Trainings(base, world, cache / "concepts", progress).all(v, 1.0, m).arts
    ia: dict[str, np.ndarray] = {}
    sa: dict[str, np.ndarray] = {}
    ta: dict[str, np.ndarray] = {}
    drift = {k: np.zeros((m, s)) for k in ("base", REFERENCE, "gated k/v + 1/N elsewhere")}
    for r in range(m):
        c, art = world.concepts[r], arts[r]
        refs = world.references(c, cfg.references, seed=0)
        ident, attrs = world.identity_attributes(c), world.text_attributes(c)
        prompts = ([world.instance_prompt(c, phrase(art), ident)] * s
                   + [world.instance_prompt(c, phrase(art), attrs)] * s)
        members = [arts[j] for j in window(r, n, m)]
        own, total = merge_deltas([art], "sum"), merge_deltas(members, "sum")
        residuals = rules(own, total, n)
        for name, res in residuals.items():
            written = [art] if name in ALONE else members
            with residual_applied(base, v.adapter, res, written):
                pics = sample(base, prompts, seeds * 2, cfg)
            for table, score in ((ia, world.image_alignment(pics[:s], refs)),
                                 (sa, world.shape_alignment(pics[:s], refs)),
                                 (ta, world.text_alignment(pics[s:], attrs))):
                table.setdefault(name, np.zeros((m, s)))[r] = score.numpy()
        class_prompts = [world.class_prompt(c, ident)] * s
        eq5 = residuals[REFERENCE]  # a class prompt holds no trigger: gated, no concept's k/v acts on it
        for name, res, written in (("base", {}, []), (REFERENCE, eq5, members),
                                   ("gated k/v + 1/N elsewhere",
                                    {k: 0 * t if is_kv(k) else t for k, t in eq5.items()}, members)):
            with residual_applied(base, v.adapter, res, written):
                drift[name][r] = world.image_alignment(sample(base, class_prompts, seeds, cfg), refs).numpy()
        progress(f"{c.name}: " + ", ".join(f"{k} {ia[k][r].mean():.2f}" for k in ia), "concept")
    drift = {k: d - drift["base"] for k, d in drift.items() if k != "base"}
    table = {name: {"image_alignment": ci(ia[name]).__dict__, "shape_alignment": float(sa[name].mean()),
                    "text_alignment": ci(ta[name]).__dict__,
                    "image_alignment_minus_eq5": paired_bootstrap([ia[name], ia[REFERENCE]], mean_diff).__dict__,
                    "text_alignment_minus_eq5": paired_bootstrap([ta[name], ta[REFERENCE]], mean_diff).__dict__}
             for name in ia}
    drifts = {name: {"prior_drift": ci(d).__dict__,
                     "minus_eq5": paired_bootstrap([d, drift[REFERENCE]], mean_diff).__dict__}
              for name, d in drift.items()}
    result = {"benchmark": "merge_rules", "env": environment("cpu", torch.float32), "base": base_spec, "arm": arm,
              "profile": profile_name, "concepts": [c.name for c in world.concepts[:m]], "n": n,
              "adapter": dataclasses.asdict(v.adapter), "train": dataclasses.asdict(v.train),
              "eval": dataclasses.asdict(cfg), "rules": table, "prior_drift_at_n": drifts,
              "seconds": time.perf_counter() - progress.t0}
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "tables.md").write_text(tables_md(result))
    return result


def tables_md(result: dict) -> str:
    def iv(d: dict) -> str:
        return f'{d["estimate"]:.3f} [{d["low"]:.3f}, {d["high"]:.3f}]'
    n = result["n"]
    rows = [[name, iv(r["image_alignment"]), iv(r["image_alignment_minus_eq5"]), f'{r["shape_alignment"]:.2f}',
             iv(r["text_alignment"]), iv(r["text_alignment_minus_eq5"])] for name, r in result["rules"].items()]
    drift = [[name, iv(d["prior_drift"]), iv(d["minus_eq5"])] for name, d in result["prior_drift_at_n"].items()]
    return (f"## Merge rules at N = {n} ({result['arm']}, {result['profile']} profile; "
            "paired over concepts x seeds)\n\n"
            + md_table(["rule", "IA", "IA − Eq. 5", "shape", "TA", "TA − Eq. 5"], rows)
            + f"\n\n## Class-prompt drift toward the concept at N = {n}\n\n"
            + md_table(["rule", "drift", "− Eq. 5"], drift) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="recipe")
    p.add_argument("--quick", action="store_true", help="CI: the retention benchmark's quick profile")
    p.add_argument("--arm", default="blocklora-mean", help="the BlockLoRA training whose set is merged")
    p.add_argument("--base", default=None, help="a diffusers folder; default: the committed toy base")
    add_study_args(p, rank=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "merge-rules")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train, study = study_configs(args)
    result = run("quick" if args.quick else args.profile, args.base or default_base_spec(), train, study, args.arm,
                 args.cache, args.out)
    emit({**result, "quick": args.quick})


if __name__ == "__main__":
    main()
