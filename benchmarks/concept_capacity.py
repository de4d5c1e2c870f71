"""What one concept can learn on a base, by adapter capacity and recipe: is the base or the adapter the limit?

    python -m benchmarks.concept_capacity           # ember (a star) and lagoon (a circle), 5 recipes, ~25 CPU-min
    python -m benchmarks.concept_capacity --quick   # CI: one concept, two recipes, 2 steps (structure only)
    python -m benchmarks.concept_capacity --recipes default --full-finetune-lr 1e-4,1e-3 \
        --out docs/results/concept-capacity/full-finetune   # the upper bound

Each recipe trains each concept alone (the main job's recipe otherwise, TOY_BASE_TRAIN: lr 5e-3, token
lr 5e-2, batch 2, its own slot; the recorded runs used 300 steps, the recipe's count then: `--steps
300`), then samples its prompt ("a large {trigger} star on a … background") with 8 seeds and scores
image alignment (the identity judge: colours by ring) and shape alignment (the silhouette) against drawn
reference pictures; beside them the base on the class prompt and the default recipe's trigger embedding
with no weights. `--full-finetune-lr` adds the default recipe with every weight of the UNet trained too,
at that lr: not an adapter and not mergeable, but what no adapter can exceed in the same steps, so it
tells a base that cannot learn the concept from an adapter too small. Intervals are paired bootstraps
over (concept, seed). Rows per slot: the smallest and largest block of rows one concept owns in a target
layer. Writes docs/results/concept-capacity/{sheet.png, result.json}. """

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.baselines import residual_applied
from benchmarks.common import RESULTS_DIR, emit, environment
from benchmarks.retention.eval import EvalConfig, phrase, sample
from benchmarks.retention.report import ci
from benchmarks.retention.study import Progress, Trainings, Variant
from benchmarks.retention.world import World, load_world
from benchmarks.stats import mean_diff, paired_bootstrap
from blocklora.config import FEED_FORWARD_TARGETS, UNET_TARGETS, AdapterConfig, TrainConfig
from blocklora.method.inject import layout
from blocklora.method.partition import owned_rows, row_count
from blocklora.pipeline.base import Base, load_base
from blocklora.pipeline.generate import contact_sheet
from blocklora.toy.concepts import ToyConcept
from blocklora.toy.recipe import TOY_BASE_TRAIN, default_base_spec
from blocklora.training.data import load_concept_images
from blocklora.training.trainer import ConceptTrainer, run_steps


@dataclasses.dataclass(frozen=True)
class Recipe:
    label: str
    adapter: dict  # overrides of AdapterConfig()
    train: dict  # overrides of the main job's recipe


RECIPES: dict[str, Recipe] = {
    "default": Recipe("attention, 16 slots (the default)", {}, {}),
    "every-row": Recipe("attention, 1 slot (every row)", {"num_slots": 1}, {}),
    "feed-forward": Recipe("attention + feed-forward, 16 slots",
                           {"unet_targets": UNET_TARGETS + FEED_FORWARD_TARGETS}, {}),
    "lr-x4": Recipe("attention, 16 slots, lr x4", {}, {"lr": 4 * TOY_BASE_TRAIN.lr}),
    "rare-token": Recipe("fixed rare token, weights only", {}, {"token_lr": 0.0, "token_init": "rare"}),
}
CONCEPT_NAMES = ("ember", "lagoon")
SHOWN = 3  # pictures per concept on the sheet
QUICK = dict(concepts="ember", recipes="default,every-row", full_finetune_lr="1e-4", steps=2, seeds=2,
             gen_steps=2)  # CI: structure only


def rows_per_slot(pipe, adapter: AdapterConfig) -> tuple[int, int]:
    """(fewest, most) rows one slot owns in any target layer of the pipeline."""
    sizes = [row_count(owned_rows(m, adapter.num_slots, 0, adapter.blockwise, adapter.row_layout), m)
             for m, _ in layout(pipe, adapter).values()]
    return min(sizes), max(sizes)


def concept_pictures(base: Base, world: World, c: ToyConcept, trigger: str, cfg: EvalConfig) -> torch.Tensor:
    """c's image-alignment prompt with `trigger`, one picture per sampling seed: (seeds, 3, H, W)."""
    prompt = world.instance_prompt(c, trigger, world.identity_attributes(c))
    return sample(base, [prompt] * len(cfg.seeds), list(cfg.seeds), cfg)


def full_finetune_label(lr: float) -> str:
    return f"whole UNet fine-tuned, lr {lr:g} (not an adapter)"


def full_finetune_pictures(base_spec: str, world: World, c: ToyConcept, i: int, train: TrainConfig,
                           unet_lr: float, cfg: EvalConfig) -> torch.Tensor:
    """Concept c trained by the default recipe with every UNet weight trained too (at `unet_lr`),
    sampled like the recipes: the most any adapter could learn in these steps. On a fresh base,
    which it changes for good."""
    base = load_base(base_spec, device="cpu")
    with tempfile.TemporaryDirectory(prefix="capacity-") as folder:
        world.write_training(c, Path(folder))
        images, captions = load_concept_images(folder, train.resolution)
    adapter = AdapterConfig()
    trainer = ConceptTrainer(base, adapter, dataclasses.replace(train, seed=train.seed + i), i % adapter.num_slots,
                             c.name, c.class_word)
    frozen = [p for p in base.pipe.unet.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    trainer.opt.add_param_group({"params": frozen, "lr": unet_lr})
    run_steps(trainer, images, captions, None, [])
    base.pipe.unet.eval()
    for te in base.text_encoders.values():
        te.eval()
    return concept_pictures(base, world, c, trainer.trigger_text, cfg)


def run(base_spec: str, names: tuple[str, ...], recipes: list[Recipe], cfg: EvalConfig,
        train: TrainConfig, cache: Path, out: Path, full_finetune_lrs: tuple[float, ...] = ()) -> dict:
    base = load_base(base_spec, device="cpu")
    world = load_world()
    index = {c.name: i for i, c in enumerate(world.concepts)}
    concepts = [world.concepts[index[n]] for n in names]
    refs = [world.references(c, cfg.references, seed=0) for c in concepts]
    seeds = list(cfg.seeds)
    progress = Progress({"training": len(recipes) * len(concepts), "whole-UNet fine-tune": len(full_finetune_lrs)})
    trainings = Trainings(base, world, cache, progress)
    scores: dict[str, dict[str, np.ndarray]] = {}
    sheet: list[tuple[str, list[Image.Image]]] = [
        ("training pictures", [p for c in concepts for p, _ in world.training(c)[:SHOWN]])]

    def score(label: str, pictures: list[torch.Tensor]) -> None:
        """pictures[i]: concept i's (seeds, 3, H, W) in [0, 1]."""
        ia = np.stack([world.image_alignment(p, r).numpy() for p, r in zip(pictures, refs)])
        sa = np.stack([world.shape_alignment(p, r).numpy() for p, r in zip(pictures, refs)])
        scores[label] = {"image_alignment": ia, "shape_alignment": sa}
        sheet.append((f"{label}: IA {ia.mean():.2f}, shape {sa.mean():.2f}",
                      [to_pil(x) for p in pictures for x in p[:SHOWN]]))

    score("base, class prompt", [sample(base, [world.class_prompt(c, world.identity_attributes(c))] * len(seeds),
                                        seeds, cfg) for c in concepts])
    info = {}
    for recipe in recipes:
        label = recipe.label
        v = Variant(label, dataclasses.replace(AdapterConfig(), **recipe.adapter),
                    dataclasses.replace(train, **recipe.train))
        arts = [trainings.concept(v, 1.0, index[c.name]) for c in concepts]
        pictures = []
        for c, art in zip(concepts, arts):
            with residual_applied(base, v.adapter, {k: art.delta(k) for k in art.meta.layout}, [art]):
                pictures.append(concept_pictures(base, world, c, phrase(art), cfg))
        score(label, pictures)
        info[label] = {"rows_per_slot": rows_per_slot(base.pipe, v.adapter), "adapter": dataclasses.asdict(v.adapter),
                       "train": dataclasses.asdict(v.train)}
        if not recipe.adapter and not recipe.train:  # the default recipe's trigger embeddings alone
            pictures = []
            for c, art in zip(concepts, arts):
                with residual_applied(base, v.adapter, {}, [art]):
                    pictures.append(concept_pictures(base, world, c, phrase(art), cfg))
            score("default's trigger embedding, no weights", pictures)
    for lr in full_finetune_lrs:
        score(full_finetune_label(lr), [full_finetune_pictures(base_spec, world, c, index[c.name], train, lr, cfg)
                                        for c in concepts])
        progress(f"whole UNet fine-tuned at lr {lr:g}", "whole-UNet fine-tune")
    out.mkdir(parents=True, exist_ok=True)
    contact_sheet(sheet, cell=96).save(out / "sheet.png")
    base_ia = scores["base, class prompt"]["image_alignment"]
    default = scores.get(RECIPES["default"].label)
    table = {label: {"image_alignment": ci(s["image_alignment"]).__dict__,
                     "shape_alignment": ci(s["shape_alignment"]).__dict__,
                     "image_alignment_minus_base": _minus(s["image_alignment"], base_ia),
                     "image_alignment_minus_default": (_minus(s["image_alignment"], default["image_alignment"])
                                                       if default else None),
                     "per_concept": {n: {k: float(v[i].mean()) for k, v in s.items()} for i, n in enumerate(names)},
                     **info.get(label, {})} for label, s in scores.items()}
    return {"benchmark": "concept_capacity", "env": environment("cpu", torch.float32), "base": base_spec,
            "concepts": list(names), "eval": dataclasses.asdict(cfg), "seconds": time.perf_counter() - progress.t0,
            "results": table}


def _minus(a: np.ndarray, b: np.ndarray) -> dict:
    """Paired difference of means (same concepts, same seeds) with its interval."""
    return paired_bootstrap([a, b], mean_diff).__dict__


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> a PIL picture."""
    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None, help="a diffusers folder; default: the committed toy base")
    p.add_argument("--concepts", default=",".join(CONCEPT_NAMES), help="names from blocklora.toy.concepts.CONCEPTS")
    p.add_argument("--recipes", default=",".join(RECIPES),
                   help="comma-separated subset of: " + "; ".join(f"{k} ({r.label})" for k, r in RECIPES.items()))
    p.add_argument("--full-finetune-lr", default="",
                   help="comma-separated UNet lrs: add the default recipe with the whole UNet trained (upper bound)")
    p.add_argument("--seeds", type=int, default=8, help="sampling seeds per concept")
    p.add_argument("--steps", type=int, default=TOY_BASE_TRAIN.steps, help="training steps per concept")
    p.add_argument("--gen-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="CI: ember, default and every-row, 2 steps, 2 seeds")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "concept-capacity")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "blocklora-capacity-cache")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args = argparse.Namespace(**{**vars(args), **QUICK})
    chosen = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in chosen if r not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; known: {list(RECIPES)}")
    # one concept at a time: the quiet penalty (about merges) stays off, as in docs/results/concept-capacity.md
    train = dataclasses.replace(TOY_BASE_TRAIN, steps=args.steps, checkpoint_every=0, quiet_weight=0.0)
    cfg = EvalConfig(ns=(1,), seeds=tuple(range(args.seeds)), steps=args.gen_steps, guidance=args.guidance)
    result = run(args.base or default_base_spec(), tuple(args.concepts.split(",")), [RECIPES[r] for r in chosen],
                 cfg, train, args.cache, args.out,
                 tuple(float(x) for x in args.full_finetune_lr.split(",") if x))
    result["quick"] = args.quick
    (args.out / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True, default=float))
    emit(result)


if __name__ == "__main__":
    main()
