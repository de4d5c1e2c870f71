"""Procedural captioned 64x64 pictures: the world the toy base is pretrained on.

Each sample is a pure function of (seed, split, index), so the data set is unlimited, needs no
download, and two machines draw the same pictures. A few (shape, colour) pairs never appear in the
training split; the "heldout" split uses only those pairs, so evaluating on it measures whether a
model composes words it has seen separately rather than recalling pictures it has seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from blocklora.toy.concepts import IDENTITIES
from blocklora.toy.draw import SIZE, SUPERSAMPLE, Dress, ToyObject, article, draw_background, draw_object, to_tensor
from blocklora.toy.vocabulary import COLOUR_NAMES, PATTERNS, SHAPES, SIZES, TEXTURES

DRESSED_RATE = 0.5  # share of main objects drawn dressed: captions name shape and main colour only
SPLITS: tuple[str, ...] = ("train", "heldout")

# One held-out colour per shape, each a different colour, so every word still occurs in training.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    (shape, COLOUR_NAMES[(3 * i + 1) % len(COLOUR_NAMES)]) for i, shape in enumerate(SHAPES)
)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (s, c) for s in SHAPES for c in COLOUR_NAMES if (s, c) not in HELDOUT_PAIRS
)


@dataclass(frozen=True)
class ToySample:
    """One picture with its caption and the labels the caption was written from."""

    image: Image.Image
    caption: str
    objects: tuple[ToyObject, ...]  # objects[0] is the main object (the larger one when two)
    background: str  # colour name
    texture: str  # "plain" | "striped" | "dotted"

    @property
    def main(self) -> ToyObject:
        return self.objects[0]


def object_phrase(obj: ToyObject, with_size: bool = True) -> str:
    return article(f"{obj.size} {obj.colour} {obj.shape}" if with_size else f"{obj.colour} {obj.shape}")


def caption_for(objects: tuple[ToyObject, ...], background: str, texture: str,
                with_size: bool = True, with_background: bool = True) -> str:
    """The caption is written from labels only, so tests can check it names what was drawn."""
    text = " and ".join(object_phrase(o, with_size) for o in objects)
    if with_background:
        pattern = "" if texture == "plain" else f"{texture} "
        text += " on " + article(f"{pattern}{background} background")
    return text


def _pick_dress(rng: np.random.Generator, shape: str, colour: str) -> Dress:
    """A random dress on (shape, colour), never one of the benchmark concepts' identities."""
    while True:
        others = [c for c in COLOUR_NAMES if c != colour]
        fill2, outline, accent = (str(c) for c in rng.choice(others, 3, replace=False))
        dress = Dress(fill2, str(rng.choice(PATTERNS)), outline, accent)
        if (shape, (colour, fill2), dress.pattern, outline, accent) not in IDENTITIES:
            return dress


def _pick_object(rng: np.random.Generator, pairs: tuple[tuple[str, str], ...], size: str,
                 x_range: tuple[float, float], dressed_rate: float = 0.0) -> ToyObject:
    shape, colour = pairs[int(rng.integers(len(pairs)))]
    radius = float(rng.uniform(*SIZES[size])) * SIZE
    margin = radius * 1.1 + 1
    x = float(rng.uniform(max(x_range[0], margin), min(x_range[1], SIZE - margin)))
    y = float(rng.uniform(margin, SIZE - margin))
    angle = float(rng.normal(0, 0.15))  # slight tilt; large turns would make a square a diamond
    dress = _pick_dress(rng, shape, colour) if rng.random() < dressed_rate else None
    return ToyObject(shape, colour, size, x, y, radius, angle, dress)


def make_sample(index: int, seed: int = 0, split: str = "train", two_object_rate: float = 0.25) -> ToySample:
    """Sample `index` of `split`: deterministic in (seed, split, index), independent of others.

    Captions sometimes omit the size or the background (30% each) so short prompts such as
    "a red star" are in distribution too; the labels always carry everything. Half the large main
    objects are dressed (`Dress`); their captions name only shape and first fill colour.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    main_pairs = TRAIN_PAIRS if split == "train" else tuple(sorted(HELDOUT_PAIRS))
    if rng.random() < two_object_rate:  # the large one is main; they sit in opposite halves
        left_main = bool(rng.integers(2))
        halves = ((0.0, SIZE / 2), (SIZE / 2, float(SIZE)))
        main = _pick_object(rng, main_pairs, "large", halves[0 if left_main else 1], DRESSED_RATE)
        other = _pick_object(rng, TRAIN_PAIRS, "small", halves[1 if left_main else 0])
        objects = (main, other)
    else:
        objects = (_pick_object(rng, main_pairs, str(rng.choice(list(SIZES))), (0.0, float(SIZE)), DRESSED_RATE),)
    used = {c for o in objects for c in o.colours}
    background = str(rng.choice([c for c in COLOUR_NAMES if c not in used]))
    texture = str(rng.choice(TEXTURES, p=[0.7, 0.15, 0.15]))
    canvas = Image.new("RGB", (SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE))
    draw_background(ImageDraw.Draw(canvas), background, texture, rng)
    for obj in reversed(objects):  # main drawn last, on top
        draw_object(canvas, obj)
    image = canvas.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    caption = caption_for(objects, background, texture, with_size=rng.random() >= 0.3,
                          with_background=rng.random() >= 0.3)
    return ToySample(image, caption, objects, background, texture)


class ToyShapes(torch.utils.data.Dataset):
    """A finite window [0, length) of the unlimited stream, as a map-style torch Dataset."""

    def __init__(self, length: int, seed: int = 0, split: str = "train", offset: int = 0) -> None:
        self.length, self.seed, self.split, self.offset = length, seed, split, offset

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        s = make_sample(self.offset + i, self.seed, self.split)
        return {
            "pixel_values": to_tensor([s.image])[0],
            "caption": s.caption,
            "shape": SHAPES.index(s.main.shape),
            "colour": COLOUR_NAMES.index(s.main.colour),
        }
