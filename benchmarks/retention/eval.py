"""One merge method on one trained set of concepts: the measurements behind Table 1, Figure 5,
Figure 3's prior drift and the per-layer interference diagnosis.

Sets are rotating windows: for N concepts and target r, S = {r, r+1, ..., r+N-1} (mod M), and r is
scored in S. Every concept is thus scored at every N, on the same prompts and sampling seeds for
every method, so any two methods (or two N) pair cell by cell over (concept, seed).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from benchmarks.baselines import input_grams, merge_deltas, residual_applied
from benchmarks.common import timed
from benchmarks.retention.world import World
from blocklora.config import AdapterConfig
from blocklora.method.artifact import ConceptArtifact
from blocklora.method.merge import LiveMerge
from blocklora.pipeline.base import Base
from blocklora.pipeline.conditioning import encode_prompts
from blocklora.toy.draw import to_tensor

EPS_TIMESTEPS = (200, 500, 800)  # the ε-space probe noises each reference picture once per timestep
FUSION_TIMESTEPS = (300, 700)  # Mix-of-Show's fusion statistics: training pictures, other noise and times
LAYER_GROUPS = {  # key substring -> the group the interference diagnosis reports
    "cross-attn k/v": ("attn2.to_k", "attn2.to_v"),
    "cross-attn q/out": ("attn2.to_q", "attn2.to_out"),
    "self-attn": ("attn1.",),
    "text encoder": ("text_encoder",),
    "feed-forward": (".ff.net.",),
}


@dataclass(frozen=True)
class EvalConfig:
    ns: tuple[int, ...]  # set sizes of the image-alignment curve (Figure 5)
    seeds: tuple[int, ...] = (0, 1, 2)  # sampling seeds per prompt
    steps: int = 10  # DDIM steps per picture
    guidance: float = 3.0
    references: int = 8  # reference pictures per concept for image alignment


@dataclass
class Concepts:
    """A trained set, indexed like the world's concepts: what a merge arm needs about it."""

    arts: list[ConceptArtifact]
    adapter: AdapterConfig


def window(r: int, n: int, m: int) -> list[int]:
    return [(r + k) % m for k in range(n)]


def group_of(key: str) -> str:
    group = next((g for g, subs in LAYER_GROUPS.items() if any(s in key for s in subs)), None)
    if group is None:
        raise ValueError(f"layer {key!r} is in no group of the interference diagnosis: add it to LAYER_GROUPS")
    return group


def phrase(art: ConceptArtifact) -> str:
    return " ".join(art.meta.triggers)


@torch.no_grad()
def sample(base: Base, prompts: list[str], seeds: list[int], cfg: EvalConfig) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1]; picture k from its own generator seeded seeds[k]."""
    return base.pipe(prompts, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, output_type="pt",
                     generator=[torch.Generator().manual_seed(s) for s in seeds],
                     height=base.resolution, width=base.resolution).images


class Merger:
    """Turns a subset of concepts into the residual its rule gives (fusion: with input statistics
    gathered once per concept), and times the N = max merge."""

    def __init__(self, base: Base, world: World, concepts: Concepts, rule: str) -> None:
        self.base, self.world, self.concepts, self.rule = base, world, concepts, rule
        self.grams: list[dict] | None = None
        self.gram_seconds = 0.0
        if rule == "fusion":
            t0 = time.perf_counter()
            self.grams = [fusion_grams(base, world, concepts.adapter, a, world.concepts[i])
                          for i, a in enumerate(concepts.arts)]
            self.gram_seconds = time.perf_counter() - t0

    def residual(self, members: list[int]) -> dict[str, torch.Tensor]:
        arts = [self.concepts.arts[j] for j in members]
        grams = [self.grams[j] for j in members] if self.grams else None
        return merge_deltas(arts, self.rule, grams=grams)

    @contextmanager
    def applied(self, members: list[int], residual: dict | None = None) -> Iterator[None]:
        arts = [self.concepts.arts[j] for j in members]
        applied = self.residual(members) if residual is None else residual
        with residual_applied(self.base, self.concepts.adapter, applied, arts):
            yield

    def merge_seconds(self, members: list[int], repeats: int = 3) -> dict[str, float]:
        """Seconds from the artifacts to the merged residual (merge_deltas: sums, TIES' trim and
        election, fusion's solve; fusion's per-concept statistics are timed apart), and for blockwise
        concepts LiveMerge.set, the product's path, which also writes the weights."""
        out = {"merge_s": float(np.median([timed(lambda: self.residual(members)) for _ in range(repeats)])),
               "fusion_statistics_s": self.gram_seconds}
        if self.concepts.adapter.blockwise and self.rule in ("sum", "mean"):
            arts = [self.concepts.arts[j] for j in members]
            live, times = LiveMerge(self.base, self.concepts.adapter), []
            for _ in range(repeats):
                times.append(timed(lambda: live.set(arts, "mean" if self.rule == "mean" else None)))
                live.set([])
            out["livemerge_s"] = float(np.median(times))
        return out


@torch.no_grad()
def fusion_grams(base: Base, world: World, adapter: AdapterConfig, art: ConceptArtifact, concept) -> dict:
    """The concept's layer-input statistics on its own training pictures, at timesteps and noise the
    ε probes never use (the generations that are scored are never data here)."""
    pics = world.training(concept)
    g = torch.Generator().manual_seed(12345)
    x = to_tensor([p for p, _ in pics])
    pipe = base.pipe
    lat = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    lat = lat.repeat(len(FUSION_TIMESTEPS), 1, 1, 1)
    t = torch.tensor([tt for tt in FUSION_TIMESTEPS for _ in pics])
    noisy = pipe.scheduler.add_noise(lat, torch.randn(lat.shape, generator=g), t)
    prompts = [cap.replace("{trigger}", phrase(art)) for _ in FUSION_TIMESTEPS for _, cap in pics]
    return input_grams(base, adapter, art, noisy, t, prompts)


@dataclass
class Probe:
    """ε-space probe of one concept: its reference pictures noised at EPS_TIMESTEPS under its prompt."""

    prompt: str
    noisy: torch.Tensor  # (L, 4, h, w)
    noise: torch.Tensor  # (L, 4, h, w)
    t: torch.Tensor  # (L,)


@torch.no_grad()
def make_probe(base: Base, world: World, concept, art: ConceptArtifact, seed: int = 99) -> Probe:
    pics = world.references(concept, 2, seed=seed)  # never the training pictures, never the IA references
    g = torch.Generator().manual_seed(seed)
    pipe = base.pipe
    lat = pipe.vae.encode(to_tensor(pics)).latent_dist.mean * pipe.vae.config.scaling_factor
    lat = lat.repeat(len(EPS_TIMESTEPS), 1, 1, 1)
    t = torch.tensor([tt for tt in EPS_TIMESTEPS for _ in pics])
    noise = torch.randn(lat.shape, generator=g)
    prompt = world.instance_prompt(concept, phrase(art), world.identity_attributes(concept))
    return Probe(prompt, pipe.scheduler.add_noise(lat, noise, t), noise, t)


@torch.no_grad()
def eps(base: Base, probe: Probe) -> torch.Tensor:
    cond, added = encode_prompts(base, [probe.prompt] * probe.t.numel())
    return base.pipe.unet(probe.noisy, probe.t, cond, added_cond_kwargs=added).sample


def sq(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


def evaluate(base: Base, world: World, concepts: Concepts, rule: str, cfg: EvalConfig,
             progress=None) -> dict:
    """Every score of one arm as (concepts, seeds) arrays, keyed by what and N."""
    m = len(concepts.arts)
    merger = Merger(base, world, concepts, rule)
    seeds = list(cfg.seeds)
    s = len(seeds)
    refs = [world.references(c, cfg.references, seed=0) for c in world.concepts[:m]]
    ends = (1, max(cfg.ns))
    out: dict = {"ia": {n: np.zeros((m, s)) for n in cfg.ns}, "sa": {n: np.zeros((m, s)) for n in ends},
                 "ta": {n: np.zeros((m, s)) for n in ends},
                 "drift": {n: np.zeros((m, s)) for n in ends}, "eps_loss": {}, "eps_retention": {}}
    probes = [make_probe(base, world, world.concepts[r], concepts.arts[r]) for r in range(m)]
    alone: list[torch.Tensor] = []
    base_class = {}
    out["ia_floor"] = np.zeros((m, s))  # the instance prompt with no concept learned: what IA is without one
    with residual_applied(base, concepts.adapter, {}, []):  # trigger rows at the table's mean: no concept
        e0 = [eps(base, p) for p in probes]
        for r, c in enumerate(world.concepts[:m]):
            ident = world.identity_attributes(c)
            prompts = ([world.class_prompt(c, ident)] * s
                       + [world.instance_prompt(c, phrase(concepts.arts[r]), ident)] * s)
            pics = sample(base, prompts, seeds * 2, cfg)
            base_class[r] = world.image_alignment(pics[:s], refs[r]).numpy()
            out["ia_floor"][r] = world.image_alignment(pics[s:], refs[r]).numpy()
    # Its own trigger embeddings and no weights: what any merge that shrinks the weights tends to
    # (α = 1/N -> 0), so the share of IA that a merge can keep or lose is ia[1] - ia_token.
    out["ia_token"] = np.zeros((m, s))
    for r, c in enumerate(world.concepts[:m]):
        art = concepts.arts[r]
        with residual_applied(base, concepts.adapter, {}, [art]):
            pics = sample(base, [world.instance_prompt(c, phrase(art), world.identity_attributes(c))] * s, seeds, cfg)
        out["ia_token"][r] = world.image_alignment(pics, refs[r]).numpy()
    out["eps_loss"]["base"] = np.array([sq(e, p.noise) for e, p in zip(e0, probes)])
    for n in sorted(set(cfg.ns) | set(ends)):
        losses, rets = [], []
        for r in range(m):
            c, art = world.concepts[r], concepts.arts[r]
            ident, attrs = world.identity_attributes(c), world.text_attributes(c)
            prompts = [world.instance_prompt(c, phrase(art), ident)] * s
            if n in ends:
                prompts += [world.instance_prompt(c, phrase(art), attrs)] * s + [world.class_prompt(c, ident)] * s
            with merger.applied(window(r, n, m)):
                pics = sample(base, prompts, seeds * (len(prompts) // s), cfg)
                e = eps(base, probes[r])
            if n in cfg.ns:
                out["ia"][n][r] = world.image_alignment(pics[:s], refs[r]).numpy()
            if n in ends:
                out["sa"][n][r] = world.shape_alignment(pics[:s], refs[r]).numpy()
                out["ta"][n][r] = world.text_alignment(pics[s:2 * s], attrs).numpy()
                out["drift"][n][r] = world.image_alignment(pics[2 * s:], refs[r]).numpy() - base_class[r]
                if n == 1:
                    alone.append(e)
                losses.append(sq(e, probes[r].noise))
                rets.append(1 - sq(e, alone[r]) / max(sq(alone[r], e0[r]), 1e-12))
            if progress:
                progress(f"N={n} concept {r + 1}/{m}")
        if n in ends:
            out["eps_loss"][n], out["eps_retention"][n] = np.array(losses), np.array(rets)
    out["merge"] = merger.merge_seconds(window(0, max(cfg.ns), m))
    if concepts.adapter.blockwise and rule in ("sum", "mean"):
        out["interference"] = interference(base, merger, probes, alone, e0, max(cfg.ns))
    return out


@torch.no_grad()
def interference(base: Base, merger: Merger, probes: list[Probe], alone: list[torch.Tensor],
                 e0: list[torch.Tensor], n: int) -> dict[str, np.ndarray]:
    """How far the other concepts' rows move concept r's prediction, per layer group: r's own
    residual in full, the others' only on that group's layers; in units of r's own effect
    E||ε_r - ε_0||². "self-scale" is r merged at its own α among the others with none of their rows
    (α = 1/N shrinks r itself: that is what the mean rule costs, not interference). "others off k/v"
    is the set with the others' cross-attention key/value rows left out: the interference a merge
    would keep if each concept's k/v residual acted only on its own trigger tokens (r's prompt holds
    no other trigger), r itself as trained."""
    m = len(probes)
    groups = [*LAYER_GROUPS, "others off k/v", "all", "self-scale"]
    out = {g: np.full(m, np.nan) for g in groups}  # NaN: no such layers here
    for r in range(m):
        members = window(r, n, m)
        full = merger.residual(members)
        own = merger.residual([r])
        effect = max(sq(alone[r], e0[r]), 1e-12)
        scale = 1.0 / n if merger.rule == "mean" else 1.0
        for g in out:
            if g == "all":
                res = full
            elif g == "self-scale":
                res = {k: scale * v for k, v in own.items()}
            else:
                def keep(k: str, g: str = g) -> bool:
                    return group_of(k) != "cross-attn k/v" if g == "others off k/v" else group_of(k) == g

                if not any(keep(k) for k in full):
                    continue
                res = {k: (full[k] - scale * own[k] if keep(k) else 0 * own[k]) + own[k] for k in full}
            with merger.applied(members, res):
                out[g][r] = sq(eps(base, probes[r]), alone[r]) / effect
    return out
