"""`python -m blocklora`: train a concept, merge a set, generate, export, inspect — no Ray needed."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from blocklora.config import TINY, AdapterConfig, GenerateConfig, PrecisionConfig, TrainConfig, add_flags, from_args
from blocklora.method.artifact import ConceptArtifact
from blocklora.pipeline.precision import base_dtype, check_mixed, dtype_of

# blocklora.pipeline.base (diffusers, transformers: seconds to import) loads in the commands that need a
# base, so `inspect`, `merge` and `--help` answer at once.


def _load(paths: list[str]) -> list[ConceptArtifact]:
    return [ConceptArtifact.load(p) for p in paths]


def _merged_base(args: argparse.Namespace):
    """The base with the given concept files merged, and the {name} -> phrase table for prompts."""
    from blocklora.method.merge import LiveMerge
    from blocklora.pipeline.base import load_base

    base = load_base(args.base, dtype=dtype_of(from_args(PrecisionConfig, args, args.parser).dtype))
    arts = _load(args.concepts)
    lm = None
    if arts:
        lm = LiveMerge(base, arts[0].meta.adapter)
        lm.set(arts, "mean" if args.mean else (args.scales or None))
    return base, (lm.phrases() if lm else {})


def cmd_train(args: argparse.Namespace) -> None:
    from blocklora.pipeline.base import default_device, load_base
    from blocklora.training.trainer import train_concept

    adapter = from_args(AdapterConfig, args, args.parser)
    train = from_args(TrainConfig, args, args.parser, resolution=args.resolution or TrainConfig.resolution)
    try:
        check_mixed(train.mixed_precision, default_device())
    except ValueError as e:
        args.parser.error(str(e))
    base = load_base(args.base, dtype=base_dtype(train.mixed_precision))
    if not args.resolution:
        train = dataclasses.replace(train, resolution=base.resolution)
    art = train_concept(base, args.images, args.name, args.class_word, args.slot, adapter, train,
                        checkpoint_dir=args.checkpoint_dir)
    path = art.save(args.out)
    print(f"wrote {path} ({path.stat().st_size:,} bytes); prompt with {{{art.name}}} "
          f"or '{' '.join(art.meta.triggers)} {art.meta.class_word}'")


def cmd_generate(args: argparse.Namespace) -> None:
    from blocklora.pipeline.generate import generate
    from blocklora.pipeline.prompts import expand

    base, phrases = _merged_base(args)
    cfg = from_args(GenerateConfig, args, args.parser, width=args.size or base.resolution,
                    height=args.size or base.resolution)
    images = generate(base, expand(args.prompt, phrases), cfg, args.num_images)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for j, img in enumerate(images):
        p = out if len(images) == 1 else out.with_name(f"{out.stem}-{j}{out.suffix}")
        img.save(p)
        print(f"wrote {p}")


def cmd_merge(args: argparse.Namespace) -> None:
    from blocklora.method.export import export_lora

    arts = _load(args.concepts)
    scales = [1.0 / len(arts)] * len(arts) if args.mean else args.scales
    paths = export_lora(arts, args.out, scales)
    print(f"wrote diffusers LoRA {paths['lora']} (pipe.load_lora_weights('{args.out}')) and "
          f"{len(paths) - 1} textual-inversion file(s)")


def cmd_inspect(args: argparse.Namespace) -> None:
    from blocklora.method.overlap import pairwise_stats, summary

    arts = _load(args.concepts)
    for a in arts:
        m = a.meta
        print(json.dumps({"name": m.name, "slot": m.slot, "triggers": m.triggers, "class_word": m.class_word,
                          "rank": m.adapter.rank, "slots": m.adapter.num_slots, "base": m.base_fingerprint[:16]}))
    first: dict[int, str] = {}
    clashes = []
    for a in arts:  # concepts of one slot cannot be merged into one picture: their rows are the same
        if a.meta.slot in first:
            clashes.append({"slot": a.meta.slot, "concepts": [first[a.meta.slot], a.name]})
        first.setdefault(a.meta.slot, a.name)
    if clashes:
        print(json.dumps({"clashes": clashes}))
    if len(arts) > 1:
        pairs = pairwise_stats({a.name: {k: a.delta(k) for k in a.meta.layout} for a in arts})
        print(json.dumps(summary(pairs)))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="blocklora", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train one concept from a folder of images into an artifact")
    t.add_argument("--base", default=TINY, help="'tiny' (or 'tiny-sd2', 'tiny-sdxl'), a diffusers folder, or a hub id")
    t.add_argument("--images", required=True)
    t.add_argument("--name", required=True)
    t.add_argument("--class-word", required=True)
    t.add_argument("--slot", type=int, default=0, help="which row block this concept owns")
    t.add_argument("--resolution", type=int, default=0, help="0: the base's native size")
    t.add_argument("--checkpoint-dir", default=None, help="resume from / checkpoint into this folder")
    t.add_argument("--out", required=True, help="artifact path (.safetensors)")
    add_flags(t, TrainConfig, skip=("resolution",))
    add_flags(t, AdapterConfig)
    t.set_defaults(fn=cmd_train, parser=t)

    for name, fn, help_ in (("generate", cmd_generate, "merge concepts into the base and sample images"),
                            ("merge", cmd_merge, "merge concepts into a standard diffusers LoRA file")):
        g = sub.add_parser(name, help=help_)
        g.add_argument("--concepts", nargs="*", default=[], help="artifact files")
        g.add_argument("--scales", nargs="*", type=float, help="α per concept (default 1.0 each)")
        g.add_argument("--mean", action="store_true", help="α = 1/N (the paper's Σα = 1 convention)")
        g.add_argument("--out", required=True)
        g.set_defaults(fn=fn, parser=g)
    gen = sub.choices["generate"]
    gen.add_argument("--base", default=TINY)
    gen.add_argument("--prompt", required=True, help="may name concepts as {name}")
    gen.add_argument("--size", type=int, default=0, help="0: the base's native size")
    gen.add_argument("--num-images", type=int, default=1)
    add_flags(gen, GenerateConfig, skip=("width", "height"))
    add_flags(gen, PrecisionConfig)

    i = sub.add_parser("inspect", help="show artifacts' metadata (slot), which share a slot (cannot be merged), "
                                       "and their pairwise weight statistics")
    i.add_argument("concepts", nargs="+")
    i.set_defaults(fn=cmd_inspect)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    args.fn(args)
