"""The paper's experiments on the toy world: Table 1, Figure 5, Table 3, Figure 3's prior drift and
Figure 4's weight statistics, with every method trained on the same concepts, seeds and slots.

    python -m benchmarks.retention --quick                # CI smoke: 2 concepts, structure only (~100 s)
    nohup python -m benchmarks.retention --profile medium &   # 16 concepts, 100 steps, N in {1, 15}
    nohup python -m benchmarks.retention --profile recipe --rank 4 &   # the main job's recipe, N in {1, 15}
    nohup python -m benchmarks.retention &                # full: 16 concepts, every arm, N in {1,2,3,5,8,15}

Arms (`ARMS`): BlockLoRA merged with α = 1/N (Eq. 5) and α = 1, its two ablations (no erasure,
no blocks) under both, DB-LoRA averaged, Mix-of-Show's weighted averaging and gradient fusion of
ED-LoRAs, Orthogonal Adaptation and TIES. Arms with the same adapter and training share one training.
`VARIANTS` (asked for by name in --arms): BlockLoRA on cross-attention's key/value only, with prior
preservation, and with the quiet penalty (`TrainConfig.quiet_weight`; with and without blocks):

    python -m benchmarks.retention --arms blocklora-mean,lora-mean,blocklora,ties,db-lora,orthogonal,\
        mix-of-show,blocklora-quiet-mean,blocklora-quiet,blocklora-quiet-no-blocks   # full + the quiet variant

Strength matching: each training variant's learning rates (LoRA and token, scaled together, so the
10:1 token:LoRA split stays) are multiplied by a factor found automatically on the first few concepts:
start at 1, halve or double until the variant's single-concept image alignment is within `--match`
of the reference's (`--reference`, by default ED-LoRA's `lora-mean`), keep the closest; the chosen
factors and the N = 1 alignments of every arm on all concepts are reported, so the match can be
checked, not assumed.

Scores (`benchmarks.retention.eval`; the judge and concepts are `benchmarks.retention.world`'s): image alignment
(CLIP-I protocol on the judge's embedding), text alignment of attribute prompts, prior drift (class-prompt
pictures' alignment to a merged concept minus the base's, same seeds), ε-space denoising loss in
absolute terms with the relative retention beside it, merge time, pairwise cosine and sign conflicts
of dW, and the per-layer-group interference of BlockLoRA's sets. Every comparison is a paired bootstrap
over (concept, sampling seed) (`benchmarks.stats.paired_bootstrap`). Trained concepts and finished arms
are cached on disk keyed by everything that determines them, so a rerun only redoes what changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.baselines import METHODS, Method, residual_applied
from benchmarks.common import RESULTS_DIR, emit, environment
from benchmarks.retention.eval import Concepts, EvalConfig, evaluate, phrase, sample
from benchmarks.retention.report import ABLATIONS, report
from benchmarks.retention.world import World, load_world
from blocklora.config import FEED_FORWARD_TARGETS, UNET_TARGETS, AdapterConfig, TrainConfig, to_json
from blocklora.method.artifact import ConceptArtifact
from blocklora.method.inject import eject, inject
from blocklora.method.overlap import pairwise_stats, summary
from blocklora.pipeline.base import Base, load_base
from blocklora.toy.recipe import default_base_spec
from blocklora.toy.vocabulary import SHAPES
from blocklora.training.trainer import train_concept

ABLATIONS_MEAN = {m.name: m for m in [Method("blocklora-no-erasure-mean", {"erasure": 0.0}, "mean"),
                                      Method("blocklora-no-blocks-mean", {"blockwise": False}, "mean")]}
# Variants to test against the claim (#12), each aimed at what docs/results/retention.md measured:
# summed, the other concepts move a concept's prediction by 24x its own effect, 16x of it through
# self-attention rows, which act on every image token whatever the prompt.
# - cross-kv: the adapter on cross-attention's key/value only, so a concept's rows act on text tokens;
# - prior: DreamBooth's prior preservation, so a concept's rows learn to leave prompts without its
#   trigger (the other concepts' prompts, once merged) as the base draws them.
# - quiet: a penalty on each layer's residual over the base's class-prompt pictures, so a concept's
#   rows stay quiet on pictures without it (docs/results/quiet-penalty.md), with its no-blocks ablation
#   (Table 3 for the variant).
CROSS_KV = {"unet_targets": ("attn2.to_k", "attn2.to_v")}
PRIOR = {"prior_preservation": True}
QUIET = {"quiet_weight": 0.1}
# - quiet-wide: the same penalty over the base's pictures of every class the toy base knows, not only the
#   concept's own: in a merge the other concepts are other classes, drawn with other words.
QUIET_WIDE = {"quiet_weight": 0.1, "quiet_classes": SHAPES}  # the toy recipe's default (docs/results/quiet-penalty.md)
QUIET_WIDE_W05 = {"quiet_weight": 0.5, "quiet_classes": SHAPES}  # five times the weight (docs/results/quiet-penalty.md)
# - quiet-wide-ff: the same on the feed-forward layers too: more rows per slot, since no lr brings a
#   concept's 1/16 of the attention rows up to ED-LoRA's strength alone (docs/results/strength-matching.md).
ATTENTION_FF = {"unet_targets": UNET_TARGETS + FEED_FORWARD_TARGETS}
# - quiet-wide-strided: the same recipe with a slot's rows spread over the attention heads (every K-th
#   row) instead of one block, which in the toy base's 4-16-wide heads lies inside a single head.
STRIDED = {"row_layout": "strided"}
ABLATED = {"": {}, "-no-erasure": {"erasure": 0.0}, "-no-blocks": {"blockwise": False}}  # Table 3's adapters


def family(name: str, adapter: dict, train: dict | None = None, ablations: tuple[str, ...] = ("",)) -> list[Method]:
    """A variant summed (`name`) and under Eq. 5 (`name-mean`), with each asked-for ablation beside it."""
    return [Method(f"{name}{a}{rule_suffix}", {**adapter, **ABLATED[a]}, rule, train or {})
            for a in ablations for rule_suffix, rule in (("", "sum"), ("-mean", "mean"))]


VARIANTS = {m.name: m for m in [*family("blocklora-cross-kv", CROSS_KV), *family("blocklora-prior", {}, PRIOR),
                                *family("blocklora-quiet", {}, QUIET, ("", "-no-blocks")),
                                *family("blocklora-quiet-wide", {}, QUIET_WIDE, tuple(ABLATED)),
                                *family("blocklora-quiet-wide05", {}, QUIET_WIDE_W05),
                                *family("blocklora-quiet-wide-ff", ATTENTION_FF, QUIET_WIDE),
                                *family("blocklora-quiet-wide-strided", STRIDED, QUIET_WIDE)]}
ALL_METHODS = {**METHODS, **ABLATIONS_MEAN, **VARIANTS}
ARMS: tuple[str, ...] = ("blocklora-mean", "lora-mean", "blocklora", "ties", "blocklora-no-erasure-mean",
                         "blocklora-no-blocks-mean", "db-lora", "orthogonal", "mix-of-show", "blocklora-no-erasure",
                         "blocklora-no-blocks")  # evaluated in this order: what the criteria need first
REFERENCE = "lora-mean"  # by default its training (ED-LoRA) is what every other variant's strength is matched to


def arm_ns(name: str, ns: tuple[int, ...]) -> tuple[int, ...]:
    """The set sizes arm `name` is scored at: every N of the curve, or the two ends for an ablation
    (what Table 3 compares; scoring them at the two ends alone is what lets `full` fit in 90 minutes)."""
    return (ns[0], ns[-1]) if name in ABLATIONS else ns


@dataclass(frozen=True)
class Profile:
    concepts: int
    steps: int  # training steps per concept
    batch: int
    ns: tuple[int, ...]  # set sizes scored (Figure 5)
    seeds: tuple[int, ...]  # sampling seeds per prompt
    gen_steps: int
    calib_concepts: int  # concepts the strength matching trains on
    calib_tries: int  # lr factors tried per variant after the first


PROFILES = {
    "quick": Profile(2, 2, 1, (1, 2), (0, 1), 2, 1, 1),
    # the main job's recipe (run it with --rank 4) on the first 6 concepts at N in {1, 6}: a variant's
    # first check, ~14 min on 2 cores for 3 trainings a concept (docs/results/quiet-penalty.md)
    "pilot": Profile(6, 300, 2, (1, 6), (0, 1, 2), 10, 1, 0),
    "small": Profile(8, 24, 1, (1, 8), (0, 1, 2), 6, 1, 0),  # what a 2-core machine under load 10-30 allowed
    # 16 concepts at N in {1, 15}, trained long enough that the weights (not only the token) carry identity
    "medium": Profile(16, 100, 1, (1, 15), (0, 1, 2), 10, 1, 0),
    # Figure 5 at six set sizes, strength matched on 2 concepts: ≤ 90 min on 2 cores (docs/results/retention.md)
    "full": Profile(16, 150, 2, (1, 2, 3, 5, 8, 15), (0, 1, 2), 10, 2, 2),
    # the main job's recipe (300 steps at batch 2; run it with --rank 4), where the weights carry
    # identity beyond the trigger (docs/results/concept-capacity.md), at N in {1, 15}
    "recipe": Profile(16, 300, 2, (1, 15), (0, 1, 2), 10, 1, 0),
    # the same, strength matched: each variant's lr factor found on 2 concepts, up to 2 steps past 1
    "recipe-matched": Profile(16, 300, 2, (1, 15), (0, 1, 2), 10, 2, 2),
}


@dataclass(frozen=True)
class Variant:
    """One training recipe (adapter + training config before the strength factor)."""

    label: str
    adapter: AdapterConfig
    train: TrainConfig


def variants(study: AdapterConfig, train: TrainConfig, arms: tuple[str, ...]) -> dict[str, Variant]:
    """Arm name -> its training variant; arms with equal recipes share one Variant object."""
    seen: dict[tuple[str, str], Variant] = {}
    out = {}
    for name in arms:
        m = ALL_METHODS[name]
        adapter, tr = m.adapter_config(study), m.train_config(train)
        key = (to_json(adapter), to_json(tr))
        out[name] = seen.setdefault(key, Variant(name, adapter, tr))
    return out


def scaled(train: TrainConfig, factor: float) -> TrainConfig:
    return dataclasses.replace(train, lr=train.lr * factor, token_lr=train.token_lr * factor)


def digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


class Trainings:
    """Trains (or loads from the cache) concept i of a variant at a strength factor."""

    def __init__(self, base: Base, world: World, cache: Path, progress: "Progress") -> None:
        self.base, self.world, self.cache, self.progress = base, world, cache, progress
        cache.mkdir(parents=True, exist_ok=True)

    def path(self, v: Variant, factor: float, i: int) -> Path:
        c = self.world.concepts[i]
        key = digest(to_json(v.adapter), to_json(scaled(v.train, factor)), self.base.fingerprint, repr(c), str(i))
        return self.cache / f"{c.name}-{key}.safetensors"

    def concept(self, v: Variant, factor: float, i: int) -> ConceptArtifact:
        c = self.world.concepts[i]
        train = scaled(v.train, factor)
        path = self.path(v, factor, i)
        if path.exists():
            self.progress.skip()
            return ConceptArtifact.load(path)
        with tempfile.TemporaryDirectory(prefix="retention-") as folder:
            self.world.write_training(c, Path(folder))
            t0 = time.perf_counter()
            art = train_concept(self.base, folder, c.name, c.class_word, slot=i % v.adapter.num_slots,
                                adapter=v.adapter, train=dataclasses.replace(train, seed=train.seed + i),
                                progress=False)
        art.save(path)
        self.progress(f"trained {v.label} x{factor:g} {c.name} ({train.steps} steps, {time.perf_counter() - t0:.0f} s)",
                      "training")
        return art

    def all(self, v: Variant, factor: float, count: int) -> Concepts:
        return Concepts([self.concept(v, factor, i) for i in range(count)], v.adapter)


class Progress:
    """Prints what finished, the elapsed time and an ETA. The work comes in kinds of very different
    cost (a training takes ~20 s, a scored window ~1 s), so each kind's remaining count is timed at
    that kind's own measured rate. Until every kind with work left has been timed once, the ETA is a
    lower bound ("≥", the timed kinds only), or "?". Cached work is never planned (see `run`)."""

    def __init__(self, planned: dict[str, float]) -> None:
        self.left = dict(planned)
        self.done = dict.fromkeys(planned, 0.0)
        self.spent = dict.fromkeys(planned, 0.0)
        self.t0 = self.last = time.perf_counter()

    def plan(self, kind: str, work: float) -> None:
        """Replan a kind's remaining work once it is known (after strength matching)."""
        self.left[kind] = work

    def skip(self) -> None:
        """Cached work was loaded: its time does not count against any kind's rate, and prints no line."""
        self.last = time.perf_counter()

    def __call__(self, what: str, kind: str, work: float = 1.0) -> None:
        now = time.perf_counter()
        self.left[kind] = max(self.left[kind] - work, 0.0)
        self.done[kind] += work
        self.spent[kind] += now - self.last
        self.last = now
        timed = [n * self.spent[k] / self.done[k] for k, n in self.left.items() if n and self.done[k]]
        untimed = any(n and not self.done[k] for k, n in self.left.items())
        eta = "     ? min" if untimed and not timed else f"{'≥' if untimed else ' '}{sum(timed) / 60:5.1f} min"
        print(f"[{(now - self.t0) / 60:6.1f} min, ETA {eta}] {what}", flush=True)


def single_alignment(base: Base, world: World, concepts: Concepts, cfg: EvalConfig) -> float:
    """Mean image alignment of each concept alone (N = 1) over the sampling seeds."""
    scores = []
    for r, art in enumerate(concepts.arts):
        c = world.concepts[r]
        with residual_applied(base, concepts.adapter, {k: art.delta(k) for k in art.meta.layout}, [art]):
            prompt = world.instance_prompt(c, phrase(art), world.identity_attributes(c))
            pics = sample(base, [prompt] * len(cfg.seeds), list(cfg.seeds), cfg)
        scores.append(float(world.image_alignment(pics, world.references(c, cfg.references, seed=0)).mean()))
    return float(np.mean(scores))


def match_strength(trainings: Trainings, vs: list[Variant], reference: Variant, count: int, tries: int,
                   tolerance: float, cfg: EvalConfig) -> tuple[dict[str, float], list[dict]]:
    """Variant label -> lr factor whose single-concept image alignment on the first `count` concepts
    is closest to the reference's (doubling or halving, at most `tries` steps past the first)."""
    base, world = trainings.base, trainings.world
    target = single_alignment(base, world, trainings.all(reference, 1.0, count), cfg)
    log = [{"variant": reference.label, "factor": 1.0, "image_alignment": target, "target": target}]
    factors = {reference.label: 1.0}
    for v in vs:
        if v is reference:
            continue
        tried: dict[float, float] = {}
        factor = 1.0
        for _ in range(tries + 1):
            tried[factor] = single_alignment(base, world, trainings.all(v, factor, count), cfg)
            log.append({"variant": v.label, "factor": factor, "image_alignment": tried[factor], "target": target})
            if abs(tried[factor] / target - 1) <= tolerance:
                break
            factor *= 2 if tried[factor] < target else 0.5
            if factor in tried:
                break  # the target lies between two tried factors: the closer one wins
        factors[v.label] = min(tried, key=lambda f: abs(tried[f] - target))
    return factors, log


def refuse_unfit(base: Base, vs: list[Variant]) -> None:
    """Every arm's adapter must fit the base (Orthogonal Adaptation needs slots x rank <= each target's
    input size: 16 x 4 > 32 on the toy base): found before the first training, not after an hour of them."""
    for v in vs:
        try:
            inject(base.pipe, v.adapter, slot=0)
        except ValueError as e:
            raise ValueError(f"arm {v.label!r} cannot run on this base: {e}") from None
        finally:
            eject(base.pipe)


def run(profile: Profile, base_spec: str, train: TrainConfig, study: AdapterConfig, arms: tuple[str, ...],
        match: float, out: Path, cache: Path, guidance: float, judge: str = "identity",
        reference: str = REFERENCE) -> dict:
    base = load_base(base_spec, device="cpu")
    train = dataclasses.replace(train, resolution=base.resolution, steps=profile.steps, batch_size=profile.batch)
    vs = variants(study, train, arms)
    distinct = list(dict.fromkeys(vs.values()))
    refuse_unfit(base, distinct)
    world = load_world(judge)
    m = profile.concepts
    if m > len(world.concepts):
        raise ValueError(f"{m} concepts asked, the world has {len(world.concepts)}")
    if not {1, profile.ns[-1]} <= set(profile.ns) or profile.ns[-1] > m:
        raise ValueError(f"set sizes {profile.ns} must include 1 and end at most at {m}")
    cfg = EvalConfig(ns=profile.ns, seeds=profile.seeds, steps=profile.gen_steps, guidance=guidance)
    cfgs = {name: dataclasses.replace(cfg, ns=arm_ns(name, cfg.ns)) for name in arms}
    windows = {name: m * len(c.ns) for name, c in cfgs.items()}  # one progress line per (N, concept)
    progress = Progress({"training": 0, "window": 0})
    trainings = Trainings(base, world, cache / "concepts", progress)
    factors, calibration = {v.label: 1.0 for v in distinct}, []

    def arm_path(name: str) -> Path:
        v = vs[name]
        key = digest(name, ALL_METHODS[name].merge, to_json(v.adapter), to_json(scaled(v.train, factors[v.label])),
                     to_json(cfgs[name]), base.fingerprint, repr(world.concepts[:m]), world.name)
        return cache / "arms" / f"{name}-{key}.json"

    def plan_uncached() -> None:
        """Only work not cached is left, so a rerun's ETA is its own (strength matching may add trainings
        at other factors: until it ends the ETA stays a lower bound)."""
        progress.plan("training", sum(not trainings.path(v, factors[v.label], i).exists()
                                      for v in distinct for i in range(m)))
        progress.plan("window", sum(windows[name] for name in arms if not arm_path(name).exists()))

    plan_uncached()
    if profile.calib_tries:
        factors, calibration = match_strength(trainings, distinct, vs[reference], profile.calib_concepts,
                                              profile.calib_tries, match, cfg)
        plan_uncached()
    trained: dict[str, Concepts] = {}
    results: dict[str, dict] = {}
    summary_: dict = {}
    for name in arms:  # trained lazily and reported after every arm, so a cut-short run still says something
        v = vs[name]
        if v.label not in trained:
            trained[v.label] = trainings.all(v, factors[v.label], m)
        path = arm_path(name)
        if path.exists():
            results[name] = decode(json.loads(path.read_text()))
            progress.skip()
            print(f"{name}: scores cached", flush=True)
        else:
            results[name] = evaluate(base, world, trained[v.label], ALL_METHODS[name].merge, cfgs[name],
                                     progress=lambda what: progress(f"{name} {what}", "window"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(encode(results[name])))
        weights = {label: summary(pairwise_stats({a.name: {k: a.delta(k) for k in a.meta.layout} for a in c.arts}))
                   for label, c in trained.items()}
        summary_ = report(results, {n: vs[n].label for n in results}, factors, calibration, weights, cfg, out,
                          tuple(VARIANTS))
    return {"benchmark": "retention", "env": environment("cpu", torch.float32), "base": base_spec,
            "judge": world.name, "concepts": [c.name for c in world.concepts[:m]],
            "profile": dataclasses.asdict(profile), "train": dataclasses.asdict(train),
            "adapter": dataclasses.asdict(study), "eval": dataclasses.asdict(cfg), "match_tolerance": match,
            "reference": reference, "lr_factors": factors, "calibration": calibration,
            "seconds": time.perf_counter() - progress.t0, **summary_}


def encode(result: dict) -> dict:
    """JSON-able copy (arrays to lists, int keys to strings)."""
    if isinstance(result, dict):
        return {str(k): encode(v) for k, v in result.items()}
    return result.tolist() if isinstance(result, np.ndarray) else result


def decode(data: dict) -> dict:
    """Inverse of `encode` for an arm's result: N keys back to int, lists back to arrays."""
    def conv(v):
        if isinstance(v, dict):
            return {(int(k) if k.isdigit() else k): conv(x) for k, x in v.items()}
        return np.array(v) if isinstance(v, list) else v
    return conv(data)


def add_study_args(p: argparse.ArgumentParser, rank: int) -> None:
    """The options that decide how the study's concepts are trained (and so their cache keys), shared by
    every benchmark that reads this cache."""
    p.add_argument("--lr", type=float, default=5e-3, help="LoRA lr before strength matching")
    p.add_argument("--token-lr-ratio", type=float, default=10.0, help="token lr = ratio x lr (ED-LoRA's 10:1)")
    p.add_argument("--rank", type=int, default=rank)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--erasure", type=float, default=0.1, help="λ of BlockLoRA's randomized output erasure")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "blocklora-retention-cache")


def study_configs(args: argparse.Namespace) -> tuple[TrainConfig, AdapterConfig]:
    """The study's training and adapter configs from `add_study_args`' options (before profile and matching)."""
    train = TrainConfig(lr=args.lr, token_lr=args.lr * args.token_lr_ratio, seed=0, checkpoint_every=0)
    return train, AdapterConfig(rank=args.rank, num_slots=args.slots, erasure=args.erasure)


def chosen_profile(name: str, ns: list[int] | None = None, calib_tries: int | None = None) -> Profile:
    """PROFILES[name], with the set sizes (sorted, once each) and the lr factors tried, where given."""
    profile = PROFILES[name]
    if ns:
        profile = dataclasses.replace(profile, ns=tuple(sorted(set(ns))))
    if calib_tries is not None:
        if calib_tries < 0:
            raise SystemExit(f"--calib-tries must be >= 0, got {calib_tries}")
        profile = dataclasses.replace(profile, calib_tries=calib_tries)
    return profile


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.retention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="full")
    p.add_argument("--quick", action="store_true", help="same as --profile quick (CI)")
    p.add_argument("--ns", type=int, nargs="+", help="set sizes to score instead of the profile's (must include 1)")
    p.add_argument("--base", default=None, help="a diffusers folder; default: the committed toy base")
    add_study_args(p, rank=2)
    p.add_argument("--match", type=float, default=0.05, help="strength matching tolerance (relative image alignment)")
    p.add_argument("--calib-tries", type=int, default=None,
                   help="lr factors tried per variant after the first, instead of the profile's "
                        "(each halves or doubles)")
    p.add_argument("--reference", default=REFERENCE, help="the arm whose training every other one's strength is "
                                                         "matched to (it stays at lr factor 1)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--judge", choices=("identity", "interim"), default="identity",
                   help="identity: blocklora.toy.identity; interim: what docs/results' small run used")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ALL_METHODS))
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="default docs/results/retention-<profile>")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    profile_name = "quick" if args.quick else args.profile
    arms = tuple(a for a in args.arms.split(",") if a)
    unknown = [a for a in arms if a not in ALL_METHODS]
    if unknown or args.reference not in arms:
        raise SystemExit(f"unknown arms {unknown} (known: {sorted(ALL_METHODS)}); {args.reference} must be among them")
    train, study = study_configs(args)
    out = args.out or RESULTS_DIR / f"retention-{profile_name}"
    profile = chosen_profile(profile_name, args.ns, args.calib_tries)
    result = run(profile, args.base or default_base_spec(), train, study, arms, args.match, out,
                 args.cache, args.guidance, args.judge, args.reference)
    result["quick"] = args.quick
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True, default=float))
    emit(result)

