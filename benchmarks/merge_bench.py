"""Merge speed, memory and exactness: BlockLoRA's LiveMerge vs diffusers + peft on SD1.5 shapes.

    python -m benchmarks.merge_bench            # ranks 4 and 8, N = 1, 5, 10, 15 (~30 min, 2 cores)
    python -m benchmarks.merge_bench --quick    # rank 4, N = 1, 2: structure and exactness (~1 min)

Both paths start from the same UNet and apply the same dW (the BlockLoRA concepts, converted to
plain LoRAs with zero-padded B for diffusers), so they differ only in how a set is merged:
- ours: `LiveMerge.add/remove/set`, which touch only the concept's own rows;
- diffusers: every change of the set is unfuse_lora -> (load_lora_weights | delete_adapters) ->
  set_adapters -> fuse_lora, the documented way to serve a fused set of LoRAs, which recomputes
  and re-adds every live adapter.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import warnings
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging

from benchmarks.baselines import merge_deltas
from benchmarks.common import (
    DTYPES,
    RESULTS_DIR,
    add_device_args,
    emit,
    environment,
    line_plot,
    peak_rss,
    random_artifact,
    sd15_base,
    timed,
    write_csv,
)
from blocklora.config import AdapterConfig
from blocklora.method.artifact import ConceptArtifact
from blocklora.method.export import to_lora_state_dict
from blocklora.method.inject import find_targets
from blocklora.method.merge import LiveMerge
from blocklora.pipeline.base import Base

NUM_SLOTS = 16
log = logging.getLogger("merge_bench")


def max_abs_diff(targets: dict[str, torch.nn.Linear], reference: dict[str, torch.Tensor]) -> float:
    return max(float((lin.weight - reference[k]).abs().max()) for k, lin in targets.items())


def dense_reference(w0: dict[str, torch.Tensor], arts: list[ConceptArtifact]) -> dict[str, torch.Tensor]:
    """W0 + Σ dW_i computed densely in fp32 and rounded once to W0's dtype, independently of either
    merge path."""
    residual = merge_deltas(arts, "sum")
    return {k: (w.float() + residual[k].to(w.device)).to(w.dtype) if residual else w for k, w in w0.items()}


def toggle_sequence(cycles: int, seed: int, count: int) -> list[int]:
    """Which slot to add-or-remove at each of `cycles` steps (the same for both paths)."""
    rng = random.Random(seed)
    return [rng.randrange(count) for _ in range(cycles)]


def bench_ours(base: Base, adapter: AdapterConfig, arts: list[ConceptArtifact], ns: list[int],
               repeats: int, cycles: int, w0: dict[str, torch.Tensor]) -> tuple[list[dict], dict]:
    lm = LiveMerge(base, adapter)
    targets = lm.targets
    rng = random.Random(1)
    rows = []
    for n in ns:
        lm.set(arts[:n - 1])
        adds, removes = [], []
        for _ in range(repeats):
            adds.append(timed(lambda: lm.add(arts[n - 1])))
            removes.append(timed(lambda: lm.remove(arts[n - 1].name)))
        lm.set([])
        with peak_rss() as mem:
            lm.set(arts[:n])
        saved = sum(t.nbytes for lv in lm.live.values() for t in lv.saved_rows)
        switches, changed = [], []
        for _ in range(repeats):
            other = rng.sample(arts, n)
            changed.append(len({a.name for a in other} ^ set(lm.live)))
            switches.append(timed(lambda: lm.set(other)))
        log.info("blocklora r%d N=%d add %.4fs", adapter.rank, n, statistics.median(adds))
        rows.append({"method": "blocklora", "rank": adapter.rank, "N": n, "add_s": statistics.median(adds),
                     "remove_s": statistics.median(removes), "switch_s": statistics.median(switches),
                     "switch_changed": statistics.mean(changed), "extra_bytes_torch": saved,
                     "extra_bytes_rss": mem["extra"]})
    lm.set([])
    restored = max_abs_diff(targets, w0)
    for slot in toggle_sequence(cycles, seed=adapter.rank, count=len(arts)):
        art = arts[slot]
        lm.remove(art.name) if art.name in lm.live else lm.add(art)
    live = [lv.artifact for lv in lm.live.values()]
    exact = {"cycles": cycles, "live_after": len(live), "restore_max_abs_diff": restored,
             "max_abs_diff_vs_dense": max_abs_diff(targets, dense_reference(w0, live))}
    cycled = {k: lin.weight.clone() for k, lin in targets.items()}
    lm.set([])
    lm.set(live)  # a fresh merge of the same set, from W0
    exact["max_abs_diff_vs_fresh"] = max(float((cycled[k] - lin.weight).abs().max()) for k, lin in targets.items())
    lm.set([])
    return rows, exact


class DiffusersPath:
    """The same concepts as plain LoRAs in the pipeline, kept fused the way diffusers documents."""

    def __init__(self, base: Base, arts: list[ConceptArtifact]) -> None:
        self.pipe, self.arts = base.pipe, {a.name: a for a in arts}
        self.loaded: set[str] = set()
        self.live: list[str] = []

    def _refuse(self, live: list[str], load: str | None = None, delete: str | None = None) -> None:
        self.pipe.unfuse_lora(components=["unet"])
        if load is not None:
            self.pipe.load_lora_weights(to_lora_state_dict([self.arts[load]]), adapter_name=load)
            self.loaded.add(load)
        if delete is not None:
            self.pipe.delete_adapters(delete)
            self.loaded.discard(delete)
        if live:
            self.pipe.enable_lora()
            self.pipe.set_adapters(live, [1.0] * len(live))
            self.pipe.fuse_lora(components=["unet"], adapter_names=live)
        elif self.loaded:
            self.pipe.disable_lora()  # loaded but unfused adapters would otherwise still apply
        self.live = list(live)

    def set(self, names: list[str]) -> None:
        """Make exactly `names` fused, loading any not yet loaded (that load is part of the cost)."""
        for name in names:
            if name not in self.loaded:
                self.pipe.load_lora_weights(to_lora_state_dict([self.arts[name]]), adapter_name=name)
                self.loaded.add(name)
        self._refuse(names)

    def add(self, name: str) -> None:
        self._refuse(self.live + [name], load=name)

    def remove(self, name: str) -> None:
        self._refuse([n for n in self.live if n != name], delete=name)

    def lora_bytes(self) -> int:
        return sum(p.nbytes for n, p in self.pipe.unet.named_parameters() if ".lora_" in n)

    def close(self) -> None:
        self.pipe.unfuse_lora(components=["unet"])
        self.pipe.unload_lora_weights()


def bench_diffusers(base: Base, adapter: AdapterConfig, arts: list[ConceptArtifact], ns: list[int],
                    repeats: int, cycles: int, w0: dict[str, torch.Tensor]) -> tuple[list[dict], dict]:
    targets = find_targets(base.pipe, adapter)  # the nn.Linear objects peft will wrap as base_layer
    names = [a.name for a in arts]
    path = DiffusersPath(base, arts)
    rng = random.Random(1)
    rows = []
    for n in ns:
        path.set(names[:n - 1])
        if names[n - 1] in path.loaded:  # left loaded by an earlier N's switches: the add must load it
            path.remove(names[n - 1])
        adds, removes = [], []
        for _ in range(repeats):
            adds.append(timed(lambda: path.add(names[n - 1])))
            removes.append(timed(lambda: path.remove(names[n - 1])))
        with peak_rss() as mem:
            path.set(names[:n])
        lora = path.lora_bytes()
        path.set(names)  # every adapter loaded; switching only changes which are fused
        path.set(names[:n])
        switches, changed = [], []
        for _ in range(repeats):
            other = [a.name for a in rng.sample(arts, n)]
            changed.append(len(set(other) ^ set(path.live)))
            switches.append(timed(lambda: path.set(other)))
        log.info("diffusers r%d N=%d add %.3fs", adapter.rank, n, statistics.median(adds))
        rows.append({"method": "diffusers-peft", "rank": adapter.rank, "N": n, "add_s": statistics.median(adds),
                     "remove_s": statistics.median(removes), "switch_s": statistics.median(switches),
                     "switch_changed": statistics.mean(changed), "extra_bytes_torch": lora,
                     "extra_bytes_rss": mem["extra"]})
    path.set([])
    with torch.no_grad():  # start the cycles from exact W0, as ours does
        for k, lin in targets.items():
            lin.weight.copy_(w0[k])
    live: set[str] = set()
    for slot in toggle_sequence(cycles, seed=adapter.rank, count=len(arts)):
        live ^= {names[slot]}
        path.set(sorted(live))
    live_arts = [path.arts[n] for n in sorted(live)]
    exact = {"cycles": cycles, "live_after": len(live),
             "max_abs_diff_vs_dense": max_abs_diff(targets, dense_reference(w0, live_arts))}
    cycled = {k: lin.weight.clone() for k, lin in targets.items()}
    path.set([])
    exact["restore_max_abs_diff"] = max_abs_diff(targets, w0)  # unfuse subtracts: W0 may not come back
    with torch.no_grad():
        for k, lin in targets.items():
            lin.weight.copy_(w0[k])
    path.set(sorted(live))  # a fresh fuse of the same set, from W0
    exact["max_abs_diff_vs_fresh"] = max(float((cycled[k] - lin.weight).abs().max()) for k, lin in targets.items())
    path.close()
    with torch.no_grad():
        for k, lin in targets.items():
            lin.weight.copy_(w0[k])
    return rows, exact


def run(ranks: list[int], ns: list[int], repeats: int, diffusers_repeats: int, cycles: int,
        diffusers_cycles: int, out: Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
        concepts: int = NUM_SLOTS) -> dict:
    """diffusers_cycles can be fewer than cycles: each of its cycles re-fuses the whole live set.
    `concepts` (one per slot, at most NUM_SLOTS) is the pool switches draw from: diffusers loads all."""
    base = sd15_base(device=device, dtype=dtype)
    rows, exactness = [], {}
    for rank in ranks:
        adapter = AdapterConfig(rank=rank, num_slots=NUM_SLOTS, text_targets=())
        targets = find_targets(base.pipe, adapter)
        layout = {k: (lin.out_features, lin.in_features) for k, lin in targets.items()}
        w0 = {k: lin.weight.detach().clone() for k, lin in targets.items()}
        arts = [random_artifact(base, adapter, layout, slot, seed=100 * rank + slot) for slot in range(concepts)]
        ours, ex_ours = bench_ours(base, adapter, arts, ns, repeats, cycles, w0)
        theirs, ex_theirs = bench_diffusers(base, adapter, arts, ns, diffusers_repeats, diffusers_cycles, w0)
        rows += ours + theirs
        exactness[f"r{rank}"] = {"blocklora": ex_ours, "diffusers-peft": ex_theirs}
    write_csv(out / "merge_speed.csv", rows)
    summary = summarize(rows, ns)
    for metric, label in (("add_s", "add one concept"), ("switch_s", "switch to another subset")):
        series = {f"{m} r{r}": ([x["N"] for x in rows if x["method"] == m and x["rank"] == r],
                                [x[metric] for x in rows if x["method"] == m and x["rank"] == r])
                  for m in ("blocklora", "diffusers-peft") for r in ranks}
        line_plot(out / f"merge_{metric[:-2]}.png", series, "concepts live (N)", "seconds (median)",
                  f"SD1.5-shaped UNet: {label}", logy=True)
    return {"benchmark": "merge", "env": environment(device, dtype), "num_slots": NUM_SLOTS, "concepts": concepts,
            "ranks": ranks, "N": ns, "repeats": repeats, "diffusers_repeats": diffusers_repeats,
            "targets": len(find_targets(base.pipe, AdapterConfig(text_targets=()))),
            "summary": summary, "exactness": exactness, "rows": rows}


def summarize(rows: list[dict], ns: list[int]) -> dict:
    """The two targets: flat in N (last add within 1.5x of the first) and >= 20x faster at max N."""
    out = {}
    for rank in sorted({r["rank"] for r in rows}):
        get = {(r["method"], r["N"]): r for r in rows if r["rank"] == rank}
        first, last = ns[0], ns[-1]
        ours_first, ours_last = get["blocklora", first], get["blocklora", last]
        theirs_last = get["diffusers-peft", last]
        out[f"r{rank}"] = {
            "ours_add_growth": ours_last["add_s"] / ours_first["add_s"],
            "speedup_add_at_max_N": theirs_last["add_s"] / ours_last["add_s"],
            "speedup_remove_at_max_N": theirs_last["remove_s"] / ours_last["remove_s"],
            "speedup_switch_at_max_N": theirs_last["switch_s"] / ours_last["switch_s"],
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="rank 4, N = 1 and 2, fewer repeats and diffusers cycles")
    p.add_argument("--ranks", type=int, nargs="+", help="adapter ranks (default: 4 8; --quick: 4)")
    p.add_argument("--ns", type=int, nargs="+",
                   help="numbers of live concepts, at most 16 (default: 1 5 10 15; --quick: 1 2)")
    p.add_argument("--diffusers-cycles", type=int, default=20,
                   help="add/remove cycles of the exactness check on the diffusers path (ours always runs 100)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "merge", help="folder for CSV and PNG")
    add_device_args(p)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 by default: on a shared machine, idle-waiting OpenMP threads "
                        "of an oversubscribed CPU make small ops erratic")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    diffusers_logging.set_verbosity_error()  # one "no text-encoder LoRA keys" line per load otherwise
    warnings.filterwarnings("ignore", module="peft")  # "Already unmerged" and friends, by design here
    where = {"out": args.out, "device": args.device, "dtype": DTYPES[args.dtype]}
    if args.quick:
        result = run(args.ranks or [4], args.ns or [1, 2], repeats=5, diffusers_repeats=1, cycles=100,
                     diffusers_cycles=2, concepts=4, **where)
    else:
        result = run(args.ranks or [4, 8], args.ns or [1, 5, 10, 15], repeats=20, diffusers_repeats=1, cycles=100,
                     diffusers_cycles=args.diffusers_cycles, **where)
    result["quick"] = args.quick
    emit(result)


if __name__ == "__main__":
    main()
