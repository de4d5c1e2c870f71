"""Identity retention under merging (the paper's Figures 4, 5 and Table 3, on a small base).

    python -m benchmarks.retention --quick                      # M = 4, few steps (< 5 min)
    nohup python -m benchmarks.retention &                      # M = 15 on the embedded tiny base
    python -m benchmarks.retention --base models/toy-base       # on the pretrained toy base
    python -m benchmarks.retention --clip-pretrained PATH       # adds CLIP alignment (open_clip weights)

Every method of `blocklora.baselines.METHODS` (plus BlockLoRA at λ = 0.25 and 0.5 for the λ sweep)
trains the same M concepts — same images, seeds, steps, slots — and is then merged for
N = 1..M. For every concept i of a merged set S:
- retention = 1 - E||ε_S - ε_i||² / E||ε_i - ε_0||² on i's prompt over fixed noisy latents of i's
  images (ε_i: i alone, as its client trained it; ε_0: the base). 1 = i behaves as if alone.
- prior drift = E||ε_S(c) - ε_0(c)||² over class-word prompts without triggers, divided by the
  mean E||ε_i - ε_0||² of the set's concepts: how far unrelated prompts move, in units of a
  concept's own effect.
- image MAE = mean |x_S - x_i| in [0, 1] between same-seed generations of S and of i alone.
- judge identity = cosine between the features the toy judge (blocklora.toy.judge) extracts from i's
  generation in S and the mean features of i's training images: an image-space identity score
  like the paper's DINO / CLIP-I, with `judge_identity_without_concepts` as its floor.
And for the M trained concepts: pairwise cosine and sign conflicts of dW (weight space), and
fit = 1 - denoising loss of i alone / loss of the base on i's images (did the concept learn?).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import RESULTS_DIR, emit, environment, line_plot, write_csv
from blocklora.artifact import ConceptArtifact
from blocklora.base import Base, load_base
from blocklora.baselines import METHODS, input_grams, merge_deltas, residual_applied
from blocklora.conditioning import encode_prompts
from blocklora.config import AdapterConfig, TrainConfig, to_json
from blocklora.toy.judge import Judge, load_judge
from blocklora.stats import pairwise_stats, summary
from blocklora.trainer import train_concept

CLASS_WORDS = ("dog", "cat", "vase", "toy", "car", "bird", "chair", "mug")
PALETTE = ((220, 40, 40), (245, 150, 30), (235, 220, 40), (40, 170, 70),
           (40, 90, 220), (150, 60, 190), (240, 240, 240), (25, 25, 25))
PATTERNS = ("hstripes", "vstripes", "checker", "diagonal", "disc", "ring", "cross", "dots")
LAMBDAS = (0.0, 0.1, 0.25, 0.5)
EVAL_TIMESTEPS = (200, 600)  # each image is noised once per timestep
FUSION_TIMESTEPS = (400, 800)  # where Mix-of-Show's fusion gathers layer inputs: not the probe's


@dataclass(frozen=True)
class Variant:
    """A method as trained and merged here (the λ sweep adds BlockLoRA variants)."""

    name: str
    adapter: AdapterConfig
    rule: str  # merge rule of blocklora.baselines.merge_deltas


def variants(study: AdapterConfig) -> list[Variant]:
    out = [Variant(name, m.adapter_config(study), m.merge) for name, m in METHODS.items()]
    blocklora = METHODS["blocklora"].adapter_config(study)
    known = {v.adapter.erasure for v in out if v.adapter.blockwise}
    out += [Variant(f"blocklora-lambda{lam}", dataclasses.replace(blocklora, erasure=lam), "sum")
            for lam in LAMBDAS if lam not in known]
    return out


def concept_images(index: int, size: int, count: int = 4) -> list[Image.Image]:
    """Concept `index`: one (pattern, colour, background) triple, its images differ by offset.
    The first 8 concepts use pattern i in colour i; the next 8 shift the colour by 3."""
    pattern = PATTERNS[index % len(PATTERNS)]
    fg_index = (index + 3 * (index // len(PATTERNS))) % len(PALETTE)
    fg, bg = np.array(PALETTE[fg_index]), np.array(PALETTE[(fg_index + 4) % len(PALETTE)])
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:size, 0:size]
    period = max(4, size // 6)
    images = []
    for _ in range(count):
        off = int(rng.integers(period))
        cx, cy = rng.uniform(0.35, 0.65, 2) * size
        d2 = (xx - cx) ** 2 + (yy - cy) ** 2
        mask = {
            "hstripes": ((yy + off) // (period // 2)) % 2 == 0,
            "vstripes": ((xx + off) // (period // 2)) % 2 == 0,
            "checker": ((xx + off) // period + (yy + off) // period) % 2 == 0,
            "diagonal": ((xx + yy + off) // (period // 2)) % 2 == 0,
            "disc": d2 < (0.3 * size) ** 2,
            "ring": (d2 > (0.18 * size) ** 2) & (d2 < (0.32 * size) ** 2),
            "cross": (np.abs(xx - cx) < size / 10) | (np.abs(yy - cy) < size / 10),
            "dots": ((xx + off) % period < period // 2) & ((yy + off) % period < period // 2),
        }[pattern]
        images.append(Image.fromarray(np.where(mask[..., None], fg, bg).astype(np.uint8)))
    return images


def train_all(base: Base, vs: list[Variant], m: int, train: TrainConfig, cache: Path) -> dict[str, list[ConceptArtifact]]:
    """Every variant's M concepts; variants with equal adapters share one training (lora-mean,
    lora-sum and ties train the same plain LoRA), and finished artifacts are cached on disk."""
    data = Path(tempfile.mkdtemp(prefix="retention-data-"))
    for i in range(m):
        for k, im in enumerate(concept_images(i, base.resolution)):
            (data / f"c{i}").mkdir(exist_ok=True)
            im.save(data / f"c{i}" / f"{k}.png")
    trained: dict[AdapterConfig, list[ConceptArtifact]] = {}
    for v in vs:
        if v.adapter in trained:
            continue
        arts = []
        for i in range(m):
            key = hashlib.sha256(f"{to_json(v.adapter)}{to_json(train)}{base.fingerprint}{i}".encode()).hexdigest()[:16]
            path = cache / f"c{i}-{key}.safetensors"
            if path.exists():
                arts.append(ConceptArtifact.load(path))
                continue
            art = train_concept(base, data / f"c{i}", f"c{i}", CLASS_WORDS[i % len(CLASS_WORDS)], slot=i,
                                adapter=v.adapter, train=dataclasses.replace(train, seed=train.seed + i),
                                progress=False)
            art.save(path)
            arts.append(art)
        trained[v.adapter] = arts
    return {v.name: trained[v.adapter] for v in vs}


@dataclass
class Probe:
    """Fixed inputs every model is evaluated on: per concept, its prompt and noisy latents of its
    images; and class-word prompts over noise, for the prior."""

    prompts: list[str]  # (M,)
    noisy: torch.Tensor  # (M, L, 4, h, w)
    noise: torch.Tensor  # (M, L, 4, h, w): the denoising target
    t: torch.Tensor  # (L,)
    class_prompts: list[str]
    class_noisy: torch.Tensor  # (C, 4, h, w)
    class_t: torch.Tensor  # (C,)


def reference_images(i: int, size: int) -> torch.Tensor:
    """Concept i's training images as (4, 3, size, size) in [0, 1]."""
    return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)
                        for im in concept_images(i, size)])


@torch.no_grad()
def noisy_latents(base: Base, i: int, timesteps: tuple[int, ...], g: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concept i's images encoded and noised once per timestep: (noisy, noise, t), 4 x len(timesteps) each."""
    pipe = base.pipe
    t = torch.tensor([tt for tt in timesteps for _ in range(4)])
    x = reference_images(i, base.resolution) * 2 - 1
    lat = pipe.vae.encode(x).latent_dist.mean.repeat(len(timesteps), 1, 1, 1) * pipe.vae.config.scaling_factor
    noise = torch.randn(lat.shape, generator=g)
    return pipe.scheduler.add_noise(lat, noise, t), noise, t


def fusion_grams(base: Base, adapter: AdapterConfig, arts: list[ConceptArtifact]) -> list[dict[str, torch.Tensor]]:
    """Each concept's layer-input statistics for gradient fusion, gathered on its own images at
    timesteps and noise the probes never use, so fusion is not fitted to what it is scored on."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i, a in enumerate(arts):
        noisy, _, t = noisy_latents(base, i, FUSION_TIMESTEPS, g)
        out.append(input_grams(base, adapter, a, noisy, t, [prompt_of(a)] * len(t)))
    return out


def judge_identity(judge: Judge, images: torch.Tensor, refs: list[torch.Tensor], concepts: list[int]) -> torch.Tensor:
    """Judge identity of images[k] (a generation of concept concepts[k]) to that concept's images."""
    return torch.stack([judge.similarity(images[k:k + 1], refs[i])[0] for k, i in enumerate(concepts)])


def prompt_of(art: ConceptArtifact) -> str:
    return f"a photo of {' '.join(art.meta.triggers)} {art.meta.class_word}"


@torch.no_grad()
def make_probe(base: Base, arts: list[ConceptArtifact], seed: int = 0) -> Probe:
    g = torch.Generator().manual_seed(seed)
    noisy, noises = [], []
    for i in range(len(arts)):
        x, noise, t = noisy_latents(base, i, EVAL_TIMESTEPS, g)
        noisy.append(x)
        noises.append(noise)
    words = sorted({a.meta.class_word for a in arts})
    class_prompts = [f"a photo of {w}" for w in words for _ in EVAL_TIMESTEPS]
    shape = noisy[0].shape[1:]
    return Probe([prompt_of(a) for a in arts],
                 torch.stack(noisy), torch.stack(noises), t, class_prompts,
                 torch.randn((len(class_prompts), *shape), generator=g),
                 torch.tensor(list(EVAL_TIMESTEPS) * len(words)))


@torch.no_grad()
def eps(base: Base, adapter: AdapterConfig, residual: dict, arts: list[ConceptArtifact], probe: Probe,
        concepts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise predictions of W0 + residual (with `arts`' trigger embeddings) on the probes of
    `concepts` (K, L, ...) and on the class prompts (C, ...)."""
    unet = base.pipe.unet
    with residual_applied(base, adapter, residual, arts):
        L = probe.t.numel()
        prompts = [probe.prompts[i] for i in concepts for _ in range(L)]
        cond, _ = encode_prompts(base, prompts + probe.class_prompts)
        x = torch.cat([probe.noisy[concepts].flatten(0, 1), probe.class_noisy])
        t = torch.cat([probe.t.repeat(len(concepts)), probe.class_t])
        out = unet(x, t, cond).sample
    k = len(concepts) * L
    return out[:k].reshape(len(concepts), L, *out.shape[1:]), out[k:]


@torch.no_grad()
def generate(base: Base, adapter: AdapterConfig, residual: dict, arts: list[ConceptArtifact],
             probe: Probe, concepts: list[int], steps: int) -> torch.Tensor:
    """Same-seed images (K, 3, H, W) in [0, 1] of each concept's prompt: seed 1000 + i for concept i."""
    gens = [torch.Generator().manual_seed(1000 + i) for i in concepts]
    with residual_applied(base, adapter, residual, arts):
        return base.pipe([probe.prompts[i] for i in concepts], num_inference_steps=steps, generator=gens,
                         guidance_scale=3.0, output_type="pt", height=base.resolution, width=base.resolution).images


def sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over everything but the first axis."""
    return (a - b).pow(2).flatten(1).mean(1)


def evaluate(base: Base, v: Variant, arts: list[ConceptArtifact], probe: Probe, gen_steps: int,
             eps0: tuple[torch.Tensor, torch.Tensor], judge: Judge, scorer=None) -> tuple[list[dict], list[dict], dict]:
    m = len(arts)
    idx = list(range(m))
    grams = fusion_grams(base, v.adapter, arts) if v.rule == "fusion" else None
    refs = [reference_images(i, base.resolution) for i in idx]
    base_own, base_cls = eps0
    single = [eps(base, v.adapter, merge_deltas([a], "sum"), [a], probe, [i]) for i, a in enumerate(arts)]
    own = torch.cat([s[0] for s in single])  # (M, L, ...): ε_i on i's probe
    effect = sq(own, base_own)  # (M,): E||ε_i - ε_0||²
    fit = 1 - sq(own, probe.noise) / sq(base_own, probe.noise)
    single_img = torch.cat([generate(base, v.adapter, merge_deltas([a], "sum"), [a], probe, [i], gen_steps)
                            for i, a in enumerate(arts)])
    curve, per_concept = [], []
    for n in range(1, m + 1):
        members = idx[:n]
        residual = merge_deltas(arts[:n], v.rule, grams=grams[:n] if grams else None)
        merged_own, merged_cls = eps(base, v.adapter, residual, arts[:n], probe, members)
        retention = 1 - sq(merged_own, own[:n]) / effect[:n]
        drift = float(sq(merged_cls, base_cls).mean() / effect[:n].mean())
        imgs = generate(base, v.adapter, residual, arts[:n], probe, members, gen_steps)
        mae = (imgs - single_img[:n]).abs().flatten(1).mean(1)
        ident = judge_identity(judge, imgs, refs, members)
        curve.append({"method": v.name, "N": n, "retention_mean": float(retention.mean()),
                      "retention_min": float(retention.min()), "prior_drift": drift,
                      "image_mae_mean": float(mae.mean()),
                      "judge_identity_mean": float(ident.mean())})
        per_concept += [{"method": v.name, "N": n, "concept": arts[i].name, "retention": float(retention[i]),
                         "image_mae": float(mae[i]), "judge_identity": float(ident[i])}
                        for i in members]
    stats = summary(pairwise_stats({a.name: {k: a.delta(k) for k in a.meta.layout} for a in arts}))
    row = {"method": v.name, "erasure": v.adapter.erasure, "blockwise": v.adapter.blockwise, "rule": v.rule,
           "fit_mean": float(fit.mean()), "retention_at_M": curve[-1]["retention_mean"],
           "retention_area": statistics.mean(c["retention_mean"] for c in curve),
           "prior_drift_at_M": curve[-1]["prior_drift"], "image_mae_at_M": curve[-1]["image_mae_mean"], **stats}
    row["judge_identity_single"] = float(judge_identity(judge, single_img, refs, idx).mean())
    row["judge_identity_at_M"] = curve[-1]["judge_identity_mean"]
    if scorer is not None:
        row.update(clip_scores(scorer, arts, probe, single_img, imgs))
    return curve, per_concept, row


def clip_scores(scorer, arts: list[ConceptArtifact], probe: Probe, single: torch.Tensor,
                merged: torch.Tensor) -> dict[str, float]:
    """CLIP image / text alignment of each concept alone and within the full merged set."""
    out: dict[str, list[float]] = {}
    for i, a in enumerate(arts):
        refs = concept_images(i, single.shape[-1])
        for tag, img in (("single", single[i]), ("merged", merged[i])):
            s = scorer.score([img], refs, probe.prompts[i], a.meta.triggers, a.meta.class_word)
            for k, val in s.items():
                out.setdefault(f"clip_{k}_{tag}", []).append(val)
    return {k: statistics.mean(v) for k, v in out.items()}


def run(spec: str, m: int, train: TrainConfig, study: AdapterConfig, gen_steps: int, out: Path,
        cache: Path, clip: tuple[str, str] | None) -> dict:
    base = load_base(spec, device="cpu")
    train = dataclasses.replace(train, resolution=base.resolution)  # train at the base's native size
    vs = variants(study)
    t0 = time.perf_counter()
    trained = train_all(base, vs, m, train, cache)
    train_s = time.perf_counter() - t0
    probe = make_probe(base, trained[vs[0].name])
    eps0 = eps(base, study, {}, [], probe, list(range(m)))
    judge = load_judge()
    base_imgs = generate(base, study, {}, [], probe, list(range(m)), gen_steps)  # the prompts, no concept
    judge_floor = float(judge_identity(judge, base_imgs, [reference_images(i, base.resolution) for i in range(m)],
                                       list(range(m))).mean())
    scorer = None
    if clip is not None:
        from blocklora.evaluation import ClipScorer
        scorer = ClipScorer(clip[0], clip[1])
    curves, per_concept, rows = [], [], []
    for v in vs:
        c, p, r = evaluate(base, v, trained[v.name], probe, gen_steps, eps0, judge, scorer)
        curves += c
        per_concept += p
        rows.append(r)
    write_csv(out / "retention_curve.csv", curves)
    write_csv(out / "retention_per_concept.csv", per_concept)
    write_csv(out / "methods.csv", rows)
    names = [v.name for v in vs if not v.name.startswith("blocklora-lambda")]
    for metric, label in (("retention_mean", "retention (mean over the set)"), ("prior_drift", "prior drift"),
                          ("image_mae_mean", "image MAE vs. concept alone"),
                          ("judge_identity_mean", "judge identity (cosine to the concept's images)")):
        series = {n: ([c["N"] for c in curves if c["method"] == n], [c[metric] for c in curves if c["method"] == n])
                  for n in names}
        line_plot(out / f"{metric}_vs_N.png", series, "concepts merged (N)", label, f"{spec} base, M={m}")
    by_lambda = {r["erasure"]: r for r in rows if r["blockwise"] and r["rule"] == "sum"}
    sweep = [{"lambda": lam, "fit_mean": by_lambda[lam]["fit_mean"], "retention_at_M": by_lambda[lam]["retention_at_M"],
              "retention_area": by_lambda[lam]["retention_area"]} for lam in LAMBDAS]
    write_csv(out / "lambda_sweep.csv", sweep)
    line_plot(out / "lambda_sweep.png", {k: (list(LAMBDAS), [s[k] for s in sweep]) for k in
                                         ("fit_mean", "retention_at_M", "retention_area")},
              "erasure rate λ", "score", "BlockLoRA: erasure rate sweep")
    return {"benchmark": "retention", "env": environment("cpu", torch.float32), "base": spec, "M": m,
            "train": dataclasses.asdict(train), "adapter": dataclasses.asdict(study), "gen_steps": gen_steps,
            "train_seconds": train_s, "judge_identity_without_concepts": judge_floor, "methods": {r["method"]: {k: v for k, v in r.items() if k != "method"} for r in rows},
            "lambda_sweep": sweep, "lambda_best_retention": max(sweep, key=lambda s: s["retention_area"])["lambda"],
            "clip": {"model": clip[0], "pretrained": clip[1]} if clip else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="M = 4, 8 steps, 2 sampling steps")
    p.add_argument("--base", default="tiny", help="'tiny' or a diffusers folder such as models/toy-base")
    p.add_argument("--concepts", type=int, default=15, help="M, at most --slots")
    p.add_argument("--steps", type=int, default=40, help="training steps per concept")
    p.add_argument("--batch", type=int, default=1, help="images per training step")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--rank", type=int, default=2, help="rank 2 x 16 slots fits orthogonal A in 32-wide layers")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--gen-steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--clip-model", default="ViT-B-32")
    p.add_argument("--clip-pretrained", default=None, help="local open_clip weights: adds CLIP alignment")
    p.add_argument("--out", type=Path, default=None, help="default docs/results/retention[-<base>]")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "blocklora-retention-cache")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.concepts, args.steps, args.gen_steps = 4, 8, 2
    out = args.out or RESULTS_DIR / ("retention" if args.base == "tiny" else f"retention-{Path(args.base).name}")
    train = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, seed=0, checkpoint_every=0)
    study = AdapterConfig(rank=args.rank, num_slots=args.slots, erasure=0.1)
    clip = (args.clip_model, args.clip_pretrained) if args.clip_pretrained else None
    result = run(args.base, args.concepts, train, study, args.gen_steps, out, args.cache, clip)
    result["quick"] = args.quick
    (out / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True, default=float))
    emit(result)


if __name__ == "__main__":
    main()
