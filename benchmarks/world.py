"""The concept world and identity judge the retention benchmark scores with, behind one small interface.

`blocklora.toy.concepts` / `blocklora.toy.identity` (issue #12's in-distribution concepts and judge)
are used when this checkout has them; until then an interim world stands in: toy shapes the base
knows (several sharing a class word) with a fixed two-colour fill pattern and outline colour, and
the toy judge's pooled features as the image embedding. Swapping is this file only.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from blocklora.toy.data import COLOURS, SIZE, _polygon
from blocklora.toy.judge import load_judge


class World(Protocol):
    """What the benchmark needs from a concept world and its judge."""

    concepts: list  # each has .name and .class_word

    def training(self, c) -> list[tuple[Image.Image, str]]: ...  # pictures + captions with "{trigger}"

    def references(self, c, count: int, seed: int) -> list[Image.Image]: ...

    def instance_prompt(self, c, trigger: str, attributes: dict | None = None) -> str: ...

    def class_prompt(self, c) -> str: ...

    def attribute_sets(self, c) -> list[dict]: ...  # for text alignment: "on a green background", ...

    def image_alignment(self, generated: torch.Tensor, references: list[Image.Image]) -> torch.Tensor: ...

    def text_alignment(self, generated: torch.Tensor, attributes: dict) -> torch.Tensor: ...


def load_world() -> World:
    if importlib.util.find_spec("blocklora.toy.identity") and importlib.util.find_spec("blocklora.toy.concepts"):
        raise NotImplementedError("wire blocklora.toy.concepts / identity here")  # lands with issue #12a
    return InterimWorld()


PATTERNS = ("stripes", "dots", "checks")
CLASS_SHAPES = ("star", "star", "star", "heart", "heart", "heart", "circle", "circle", "square", "square",
                "triangle", "triangle", "cross", "cross", "star", "heart")
NAMES = tuple(COLOURS)


@dataclass(frozen=True)
class InterimConcept:
    name: str
    class_word: str  # a shape the base knows
    pattern: str
    fill: tuple[str, str]  # two colours of the fill pattern
    outline: str


def _concept(i: int) -> InterimConcept:
    fill = (NAMES[i % 8], NAMES[(i * 3 + 2) % 8 if (i * 3 + 2) % 8 != i % 8 else (i + 1) % 8])
    outline = next(c for c in (NAMES[(i * 5 + 4) % 8], *NAMES) if c not in fill)
    return InterimConcept(f"c{i:02d}-{CLASS_SHAPES[i]}", CLASS_SHAPES[i], PATTERNS[i % 3], fill, outline)


def draw_concept(c: InterimConcept, rng: np.random.Generator, background: str | None = None) -> tuple[Image.Image, str]:
    ss = 2
    n = SIZE * ss
    background = background or str(rng.choice([b for b in NAMES if b not in (*c.fill, c.outline)]))
    r = float(rng.uniform(0.27, 0.34)) * n
    x, y = (float(v) for v in rng.uniform(r * 1.1, n - r * 1.1, 2))
    angle = float(rng.normal(0, 0.12))
    mask = Image.new("L", (n, n))
    md = ImageDraw.Draw(mask)
    if c.class_word == "circle":
        md.ellipse([x - r, y - r, x + r, y + r], fill=255)
    else:
        md.polygon(_polygon(c.class_word, x, y, r, angle), fill=255)
    yy, xx = np.mgrid[0:n, 0:n]
    period = int(rng.integers(9, 13)) * ss // 2
    sel = {"stripes": (xx + yy) // period % 2 == 0, "dots": (np.hypot(xx % (2 * period) - period, yy % (2 * period) - period) < period * 0.6),
           "checks": (xx // period + yy // period) % 2 == 0}[c.pattern]
    fill = np.where(sel[..., None], COLOURS[c.fill[0]], COLOURS[c.fill[1]]).astype(np.uint8)
    canvas = Image.new("RGB", (n, n), COLOURS[background])
    canvas.paste(Image.fromarray(fill), mask=mask)
    outline = mask.filter(__import__("PIL.ImageFilter", fromlist=["MaxFilter"]).MaxFilter(7))
    ring = Image.fromarray(((np.asarray(outline) > 0) & (np.asarray(mask) == 0)).astype(np.uint8) * 255)
    canvas.paste(Image.new("RGB", (n, n), COLOURS[c.outline]), mask=ring)
    return canvas.resize((SIZE, SIZE), Image.Resampling.LANCZOS), f"a large {{trigger}} {c.class_word} on a {background} background"


class InterimWorld:
    def __init__(self, count: int = 16) -> None:
        self.concepts = [_concept(i) for i in range(count)]
        self.judge = load_judge()

    def training(self, c: InterimConcept) -> list[tuple[Image.Image, str]]:
        rng = np.random.default_rng([7, self.concepts.index(c)])
        return [draw_concept(c, rng) for _ in range(4)]

    def references(self, c: InterimConcept, count: int, seed: int) -> list[Image.Image]:
        rng = np.random.default_rng([8, seed, self.concepts.index(c)])
        return [draw_concept(c, rng)[0] for _ in range(count)]

    def instance_prompt(self, c: InterimConcept, trigger: str, attributes: dict | None = None) -> str:
        bg = f" on a {attributes['background']} background" if attributes else ""
        return f"a large {trigger} {c.class_word}{bg}"

    def class_prompt(self, c: InterimConcept) -> str:
        return f"a large {c.class_word}"

    def attribute_sets(self, c: InterimConcept) -> list[dict]:
        free = [b for b in NAMES if b not in (*c.fill, c.outline)]
        return [{"background": free[0]}, {"background": free[-1]}]

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.float(), size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        return F.normalize(self.judge.eval().pooled(x * 2 - 1), dim=1)

    @torch.no_grad()
    def image_alignment(self, generated: torch.Tensor, references: Sequence[Image.Image]) -> torch.Tensor:
        """(B,) mean cosine of each generated picture ([0, 1], (B, 3, H, W)) to every reference."""
        refs = torch.stack([torch.from_numpy(np.asarray(r, dtype=np.float32) / 255).permute(2, 0, 1) for r in references])
        return (self._features(generated) @ self._features(refs).T).mean(1)

    @torch.no_grad()
    def text_alignment(self, generated: torch.Tensor, attributes: dict) -> torch.Tensor:
        """(B,) share of border pixels nearest (in the palette) to the asked background colour."""
        palette = torch.tensor([COLOURS[n] for n in NAMES], dtype=torch.float32) / 255  # (8, 3)
        border = torch.cat([generated[..., :4, :].flatten(2), generated[..., -4:, :].flatten(2),
                            generated[..., :, :4].flatten(2), generated[..., :, -4:].flatten(2)], 2)  # (B, 3, P)
        nearest = torch.cdist(border.transpose(1, 2), palette[None]).argmin(-1)  # (B, P)
        return (nearest == NAMES.index(attributes["background"])).float().mean(1)
