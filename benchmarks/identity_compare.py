"""What a change did to concepts nobody drew: paired differences between `identity_check` runs.

Runs of the same identities with the same sampling seeds (one recipe or sampling setting changed) score
the same prompts from the same noise, so each of their conditions pairs cell by cell. Per condition
scored in the first run and in another: that run's IA minus the first's, the change in what a merge keeps
(merged / alone), and for "alone" and the drawn ceiling the change in the gain over the bare base, each
with a paired bootstrap (`benchmarks.stats`: concepts, then seeds within a concept). Runs written before
identity_check kept every seed's score pair over concepts only, and say so.

    python -m benchmarks.identity_compare docs/results/identity/n15-erasure-0.1 docs/results/identity/n15-erasure-0.3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.common import emit
from benchmarks.identity_check import ALONE, BASE, DRAWN
from benchmarks.stats import Interval, mean_diff, mean_ratio, paired_bootstrap


def load(run: Path) -> dict:
    """A run folder's result.json, refused unless identity_check wrote it."""
    path = run / "result.json"
    if not path.is_file():
        raise SystemExit(f"{run}: no result.json (an identity_check --out folder holds one)")
    result = json.loads(path.read_text())
    if result.get("benchmark") != "identity_check":
        raise SystemExit(f"{path}: written by {result.get('benchmark')!r}, not identity_check")
    return result


def scores(result: dict, cond: str, per_seed: bool) -> np.ndarray:
    """(concepts, seeds) scores of one condition, or (concepts, 1) per-concept means."""
    row = result["conditions"][cond]
    return np.asarray(row["per_seed"] if per_seed else [[v] for v in row["per_concept"]], dtype=np.float64)


def interval(i: Interval) -> list[float]:
    return [round(i.estimate, 4), round(i.low, 4), round(i.high, 4)]


def moved(stat: Callable, first: dict, other: dict, cond: str, ref: str, per_seed: bool, seed: int = 0) -> list[float]:
    """How far `stat(condition, reference condition)` moved from the first run to the other, paired."""
    arrays = [scores(r, c, per_seed) for r in (other, first) for c in (cond, ref)]
    return interval(paired_bootstrap(arrays, lambda x, y, z, w: stat(x, y) - stat(z, w), seed=seed))


def compare(first: dict, other: dict, per_seed: bool) -> dict[str, dict[str, list[float]]]:
    """Per condition both runs scored: `other` minus `first`, paired."""
    out: dict[str, dict[str, list[float]]] = {}
    for cond in [c for c in first["conditions"] if c in other["conditions"]]:
        row = {"ia": interval(paired_bootstrap([scores(other, cond, per_seed), scores(first, cond, per_seed)],
                                               mean_diff))}
        if cond in (ALONE, DRAWN):
            row["gain_over_base"] = moved(mean_diff, first, other, cond, BASE, per_seed)
        elif cond != BASE:
            row["kept"] = moved(mean_ratio, first, other, cond, ALONE, per_seed, seed=1)
        out[cond] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="identity_check --out folders; each later one against the first")
    args = ap.parse_args()
    if len(args.runs) < 2:
        ap.error("give two or more runs: each later one is compared with the first")
    results = [load(r) for r in args.runs]
    first = results[0]
    for run, r in zip(args.runs[1:], results[1:]):
        if r["identities"] != first["identities"] or r["seeds"] != first["seeds"]:
            raise SystemExit(f"{run} scored other identities or seeds than {args.runs[0]}: nothing to pair")
    per_seed = all("per_seed" in row for r in results for row in r["conditions"].values())
    emit({"benchmark": "identity_compare", "first": str(args.runs[0]),
          "paired_over": "concepts x seeds" if per_seed else "concepts (a run without per-seed scores)",
          "settings": {str(run): {"train": r["train"], "adapter": r["adapter"], "guidance": r["guidance"]}
                       for run, r in zip(args.runs, results)},
          "minus_first": {str(run): compare(first, r, per_seed) for run, r in zip(args.runs[1:], results[1:])}})


if __name__ == "__main__":
    main()
