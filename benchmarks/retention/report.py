"""Tables, CSVs, plots and the paper's four reproduction criteria from the retention arms' scores.

Every interval is `benchmarks.stats.paired_bootstrap` over (concept, sampling seed): two arms are
compared on the same concepts, prompts and seeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.common import write_csv
from benchmarks.retention.eval import LAYER_GROUPS, EvalConfig
from benchmarks.stats import Interval, mean, mean_diff, mean_ratio, paired_bootstrap

INSTANT_PEERS = ("lora-mean", "db-lora", "orthogonal", "ties")  # other methods' data-free merges
MAIN_ARMS = {  # BlockLoRA arm -> its (no erasure, no blocks) ablations under the same α
    "blocklora-mean": ("blocklora-no-erasure-mean", "blocklora-no-blocks-mean"),
    "blocklora": ("blocklora-no-erasure", "blocklora-no-blocks"),
    # the quiet variant (docs/results/quiet-penalty.md): its blocks' share
    "blocklora-quiet-mean": ("blocklora-quiet-no-blocks-mean",),
    "blocklora-quiet": ("blocklora-quiet-no-blocks",),
    # over every toy shape's pictures (the toy recipe's default: docs/results/quiet-penalty.md): both ablations
    "blocklora-quiet-wide-mean": ("blocklora-quiet-wide-no-erasure-mean", "blocklora-quiet-wide-no-blocks-mean"),
    "blocklora-quiet-wide": ("blocklora-quiet-wide-no-erasure", "blocklora-quiet-wide-no-blocks"),
}
# Table 3's ablations are compared at N = 1 and the largest N only; Figure 5's curve over every N is
# drawn for the methods.
ABLATIONS = frozenset(a for pair in MAIN_ARMS.values() for a in pair)
KEEP, GAP, TEXT_SLACK, STRENGTH_SPREAD = 0.95, 0.10, 0.05, 0.10  # the thresholds


def ci(a: np.ndarray) -> Interval:
    """Mean with its bootstrap interval (milliseconds: the report is rewritten after every arm)."""
    return paired_bootstrap([a], mean)


def criteria(results: dict, main: str, ablations: tuple[str, ...] = ()) -> list[dict]:
    """The four criteria of issue #12 for one BlockLoRA arm, each with its interval and verdict."""
    r, top = results[main], max(results[main]["ia"])
    rows = []
    kept = paired_bootstrap([r["ia"][top], r["ia"][1]], mean_ratio)
    rows.append({"criterion": f"N={top} keeps >= {KEEP:.0%} of its N=1 image alignment", "compared_with": "itself",
                 "interval": kept, "holds": kept.estimate >= KEEP, "sure": kept.low >= KEEP})
    peers = [p for p in INSTANT_PEERS if p in results]
    if peers:
        best = max(peers, key=lambda p: results[p]["ia"][top].mean())
        gap = paired_bootstrap([r["ia"][top], results[best]["ia"][top]], mean_diff)
        rows.append({"criterion": f">= {GAP} image alignment above the best other instant merge at N={top}",
                     "compared_with": best, "interval": gap, "holds": gap.estimate >= GAP and gap.low > 0,
                     "sure": gap.low >= GAP})
        text = paired_bootstrap([r["ta"][top], results[best]["ta"][top]], mean_diff)
        rows.append({"criterion": f"text alignment within {TEXT_SLACK} of it", "compared_with": best,
                     "interval": text, "holds": text.estimate >= -TEXT_SLACK, "sure": text.low >= -TEXT_SLACK})
    for abl in ablations:
        if abl in results:
            d = paired_bootstrap([r["ia"][top], results[abl]["ia"][top]], mean_diff)
            rows.append({"criterion": f"ablation scores lower at N={top}", "compared_with": abl, "interval": d,
                         "holds": d.estimate > 0, "sure": d.low > 0})
    return [{**row, "arm": main} for row in rows]


def fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if np.isfinite(x) else "-"


NO_INTERVAL = Interval(float("nan"), float("nan"), float("nan"))  # a score an older cached arm lacks


def md_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(r) + " |" for r in rows)])


def report(results: dict, labels: dict[str, str], factors: dict[str, float], calibration: list[dict],
           weights: dict[str, dict], cfg: EvalConfig, out: Path, variants: tuple[str, ...] = ()) -> dict:
    """Writes tables.md, the CSVs and the plots into `out`; returns the JSON summary."""
    out.mkdir(parents=True, exist_ok=True)
    top = max(cfg.ns)
    arms = list(results)
    methods, long_rows = [], []
    for name, r in results.items():
        w = weights[labels[name]]
        kept = paired_bootstrap([r["ia"][top], r["ia"][1]], mean_ratio)
        methods.append({
            "method": name, "trained_as": labels[name], "lr_factor": factors[labels[name]],
            "merge_s": r["merge"]["merge_s"], "livemerge_s": r["merge"].get("livemerge_s", float("nan")),
            "fusion_statistics_s": r["merge"]["fusion_statistics_s"],
            "ia_floor": ci(r["ia_floor"]) if "ia_floor" in r else NO_INTERVAL,
            "ia_token": ci(r["ia_token"]) if "ia_token" in r else NO_INTERVAL,
            "ia_1": ci(r["ia"][1]), f"ia_{top}": ci(r["ia"][top]), "ia_kept": kept,
            **{f"sa_{n}": ci(r["sa"][n]) if "sa" in r else NO_INTERVAL for n in (1, top)},
            "ta_1": ci(r["ta"][1]), f"ta_{top}": ci(r["ta"][top]),
            "drift_1": ci(r["drift"][1]), f"drift_{top}": ci(r["drift"][top]),
            "eps_loss_base": float(np.mean(r["eps_loss"]["base"])), "eps_loss_1": float(np.mean(r["eps_loss"][1])),
            f"eps_loss_{top}": float(np.mean(r["eps_loss"][top])),
            f"eps_retention_{top}": float(np.mean(r["eps_retention"][top])),
            "mean_abs_cosine": w["mean_abs_cosine"], "max_abs_cosine": w["max_abs_cosine"],
            "mean_sign_conflict": w["mean_sign_conflict"]})
        for n, a in r["ia"].items():
            for (c, s), v in np.ndenumerate(a):
                long_rows.append({"method": name, "N": n, "concept": c, "seed": cfg.seeds[s], "image_alignment": v,
                                  "shape_alignment": r["sa"][n][c, s] if n in r.get("sa", {}) else "",
                                  "text_alignment": r["ta"][n][c, s] if n in r["ta"] else "",
                                  "prior_drift": r["drift"][n][c, s] if n in r["drift"] else ""})
    write_csv(out / "scores.csv", long_rows)
    write_csv(out / "methods.csv", [{k: (v.estimate if isinstance(v, Interval) else v) for k, v in m.items()}
                                    for m in methods])
    if calibration:
        write_csv(out / "calibration.csv", calibration)
    # variants: the same criteria; an ablation is judged only as its arm's
    judged = {**{v: () for v in variants if v not in ABLATIONS}, **MAIN_ARMS}
    crit = [row for main, abl in judged.items() if main in results for row in criteria(results, main, abl)]
    if crit:  # none when no BlockLoRA arm ran
        write_csv(out / "criteria.csv", [{**c, "estimate": c["interval"].estimate, "low": c["interval"].low,
                                          "high": c["interval"].high, "interval": str(c["interval"])} for c in crit])
    figure5(out / "image_alignment_vs_N.png", results, top)
    interference = [{"method": a, **{g: float(np.mean(v)) for g, v in results[a]["interference"].items()}}
                    for a in arms if "interference" in results[a]]
    if interference:
        write_csv(out / "interference.csv", interference)
    spread = max(results[a]["ia"][1].mean() for a in arms) / min(results[a]["ia"][1].mean() for a in arms)
    (out / "tables.md").write_text(tables_md(methods, crit, interference, calibration, top, spread))
    return {"methods": {m["method"]: {k: (v.__dict__ if isinstance(v, Interval) else v) for k, v in m.items()
                                      if k != "method"} for m in methods},
            "criteria": [{**c, "interval": c["interval"].__dict__} for c in crit],
            "interference": interference, "strength_spread_n1": spread,
            "strength_matched": spread <= 1 + STRENGTH_SPREAD}


def figure5(path: Path, results: dict, top: int) -> Path:
    """Left: image alignment vs N for every arm scored along the curve (Figure 5; bands for the BlockLoRA
    arms), beside the picture with no concept. Right: shape alignment at N = 1 and N = top for every arm.
    IA scores colours ring by ring, so a merge that wrecks its pictures can keep its IA while its shapes
    are gone: the right panel shows which merges did."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120, gridspec_kw={"width_ratios": [3, 2]})
    colours = dict(zip(results, [plt.get_cmap("tab20").colors[i % 20] for i in range(len(results))]))
    for arm, r in results.items():
        if arm in ABLATIONS:
            continue  # scored at the two ends only (Table 3): on the right
        ns = sorted(r["ia"])
        ours = arm.startswith("blocklora")
        left.plot(ns, [r["ia"][n].mean() for n in ns], marker="o", markersize=3, linewidth=2.2 if ours else 1.1,
                  color=colours[arm], label=arm)
        if ours:
            bands = [ci(r["ia"][n]) for n in ns]
            left.fill_between(ns, [b.low for b in bands], [b.high for b in bands], color=colours[arm], alpha=0.12,
                              linewidth=0)
    floors = [r["ia_floor"].mean() for r in results.values() if "ia_floor" in r]
    if floors:
        left.axhline(floors[0], linestyle=":", color="grey", label="no concept")
    left.set(xlabel="concepts merged (N)", ylabel="image alignment (judge, mean)",
             title="Figure 5 on the toy world (bands: 95% bootstrap)")
    left.grid(alpha=0.3)
    left.legend(fontsize=7, loc="lower left")
    shaped = [a for a, r in results.items() if "sa" in r]
    for y, arm in enumerate(shaped):
        one, many = results[arm]["sa"][1].mean(), results[arm]["sa"][top].mean()
        right.plot([one, many], [y, y], color=colours[arm], linewidth=2)
        right.plot(one, y, "o", color=colours[arm], markersize=5)
        right.plot(many, y, "X", color=colours[arm], markersize=7)
    right.set_yticks(range(len(shaped)), shaped, fontsize=7)
    right.invert_yaxis()
    right.axvline(0, color="grey", linewidth=0.8)
    right.set(xlabel=f"shape alignment: ● N = 1, ✕ N = {top}", title="are the shapes still drawn?")
    right.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def tables_md(methods: list[dict], crit: list[dict], interference: list[dict], calibration: list[dict],
              top: int, spread: float) -> str:
    t1 = md_table(
        ["method", "trained as (lr x)", "merge s (N=%d)" % top, "IA no concept", "IA token only", "IA N=1",
         f"IA N={top}", "kept", "SA N=1", f"SA N={top}", "TA N=1",
         f"TA N={top}", "drift N=1", f"drift N={top}", "ε loss base / 1 / %d" % top, "ε retention",
         "abs cos", "sign conflict"],
        [[m["method"], f'{m["trained_as"]} ({m["lr_factor"]:g})',
          fmt(m["merge_s"], 4) + ("" if not np.isfinite(m["livemerge_s"]) else f' (live {m["livemerge_s"]:.4f})')
          + (f' + stats {m["fusion_statistics_s"]:.1f}' if m["fusion_statistics_s"] else ""),
          str(m["ia_floor"]), str(m["ia_token"]), str(m["ia_1"]), str(m[f"ia_{top}"]), str(m["ia_kept"]),
          str(m["sa_1"]), str(m[f"sa_{top}"]), str(m["ta_1"]), str(m[f"ta_{top}"]),
          str(m["drift_1"]), str(m[f"drift_{top}"]),
          f'{m["eps_loss_base"]:.4f} / {m["eps_loss_1"]:.4f} / {m[f"eps_loss_{top}"]:.4f}',
          fmt(m[f"eps_retention_{top}"], 2), fmt(m["mean_abs_cosine"], 3), fmt(m["mean_sign_conflict"], 3)]
         for m in methods])
    t2 = md_table(["BlockLoRA arm", "criterion", "vs", "estimate [95% CI]", "holds", "CI clears the bar"],
                  [[c["arm"], c["criterion"], c["compared_with"], str(c["interval"]), "yes" if c["holds"] else "**no**",
                    "yes" if c["sure"] else "no"] for c in crit])
    groups = [*LAYER_GROUPS, "others off k/v", "all", "self-scale"]
    t3 = md_table(["method", *groups], [[i["method"], *(fmt(i.get(g, float("nan")), 3) for g in groups)]
                                        for i in interference]) if interference else "(no blockwise arm)"
    t4 = md_table(["variant", "lr factor", "single-concept IA", "target"],
                  [[c["variant"], f'{c["factor"]:g}', fmt(c["image_alignment"]), fmt(c["target"])] for c in calibration]
                  ) if calibration else ("(not run in this profile: every lr factor is 1; "
                                         "the N=1 spread above is measured)")
    return (f"## Table 1 (IA: image alignment, TA: text alignment, drift: class-prompt pictures' IA to the concept "
            f"minus the base's; mean [95% CI])\n\nIA no concept: the instance prompt with the trigger rows at the "
            f"table's mean; IA token only: the concept's own trigger embeddings and no weights, what a merge that "
            f"shrinks the weights (α = 1/N) tends to as N grows. SA: shape alignment, the silhouette's cosine to the "
            f"references (colours aside): a held-out drawn picture of the concept scores ~0.8, a shape unlike "
            f"its own ~0 (models/judge/README.md).\n\n{t1}\n\n"
            f"Strength spread at N=1 (max/min mean IA over arms): {spread:.3f} "
            f"({'within' if spread <= 1 + STRENGTH_SPREAD else 'NOT within'} {STRENGTH_SPREAD:.0%}).\n\n"
            f"## Reproduction criteria\n\n{t2}\n\n"
            f"## Interference by layer group at N={top} (E||ε - ε_alone||² / E||ε_alone - ε_base||²)\n\n{t3}\n\n"
            f"## Strength matching (first concepts)\n\n{t4}\n")
