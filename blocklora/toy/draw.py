"""Drawing the toy world's objects: shapes in a colour, dressed or not, on plain or textured
backgrounds, supersampled for smooth edges. The base's training pictures (blocklora.toy.data) and the
concepts' pictures (blocklora.toy.concepts) are both drawn with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from blocklora.toy.vocabulary import COLOURS, SHAPES

SIZE = 64  # output pixels per side
SUPERSAMPLE = 2  # supersampling factor: shapes are drawn at 128 px and downsampled for smooth edges


@dataclass(frozen=True)
class Dress:
    """What no caption names: a second fill colour in a pattern, an outline colour and a centre disc.

    Half the base's objects wear one, so the base can draw any dress and a concept (one fixed dress
    on one shape) is in distribution, yet no words ask for a particular dress: it must be learned.
    """

    fill2: str
    pattern: str  # one of PATTERNS
    outline: str
    accent: str


@dataclass(frozen=True)
class ToyObject:
    shape: str
    colour: str  # the (first) fill colour: the one captions name
    size: str  # "small" | "large"
    x: float  # centre, in pixels
    y: float
    radius: float  # in pixels
    angle: float  # rotation in radians (symmetric shapes look the same)
    dress: Dress | None = None

    @property
    def colours(self) -> tuple[str, ...]:
        d = self.dress
        return (self.colour,) if d is None else (self.colour, d.fill2, d.outline, d.accent)


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def polygon(shape: str, x: float, y: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Outline of a non-circular shape as points, centred at (x, y), radius r."""
    if shape == "square":
        ts, rs = np.arange(4) * np.pi / 2 + np.pi / 4, np.full(4, r * 0.95)
    elif shape == "triangle":
        ts, rs = np.arange(3) * 2 * np.pi / 3 - np.pi / 2, np.full(3, r * 1.1)
    elif shape == "star":
        ts, rs = np.arange(10) * np.pi / 5 - np.pi / 2, np.where(np.arange(10) % 2 == 0, r * 1.1, r * 0.45)
    elif shape == "cross":  # plus sign: 12 corners at arm half-width w
        w = 0.33 * r
        pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r),
               (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        ts = np.array([np.arctan2(py, px) for px, py in pts])
        rs = np.array([np.hypot(px, py) for px, py in pts])
    elif shape == "heart":  # the classic parametric heart, scaled to radius r
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        hx, hy = 16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        ts, rs = np.arctan2(hy + 2, hx), np.hypot(hx, hy + 2) * r / 16
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return [(x + rr * np.cos(t + angle), y + rr * np.sin(t + angle)) for t, rr in zip(ts, rs)]


def _shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """A visibly different tone of the same colour for a texture (lighter for dark, darker for light)."""
    target = 255 if sum(rgb) < 384 else 0
    return tuple(int(0.6 * c + 0.4 * target) for c in rgb)


def draw_background(draw: ImageDraw.ImageDraw, colour: str, texture: str, rng: np.random.Generator) -> None:
    n = SIZE * SUPERSAMPLE
    base = COLOURS[colour]
    draw.rectangle([0, 0, n, n], fill=base)
    if texture == "striped":
        period, vertical = int(rng.integers(6, 11)) * SUPERSAMPLE, bool(rng.integers(2))
        for k in range(0, n, period):
            box = [k, 0, k + period // 2 - 1, n] if vertical else [0, k, n, k + period // 2 - 1]
            draw.rectangle(box, fill=_shade(base))
    elif texture == "dotted":
        period, rad = int(rng.integers(7, 11)) * SUPERSAMPLE, 1.5 * SUPERSAMPLE
        for i in range(period // 2, n, period):
            for j in range(period // 2, n, period):
                draw.ellipse([i - rad, j - rad, i + rad, j + rad], fill=_shade(base))


def _pattern_mask(n: int, cx: float, cy: float, r: float, angle: float, pattern: str) -> np.ndarray:
    """(n, n) bool: True where the fill's second colour goes, in the object's own rotated frame."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) + 0.5
    dx, dy = xx - cx, yy - cy
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    # Coarse on purpose: the toy base's VAE keeps little finer than 4 px (one latent pixel).
    if pattern == "stripes":  # bands across the object, about five across a large one
        return np.floor(u / (0.42 * r)) % 2 == 1
    if pattern == "checks":
        cell = 0.55 * r
        return (np.floor(u / cell) + np.floor(v / cell)) % 2 == 1
    period = 0.85 * r  # dots on a square grid, offset so that four sit around the accent
    gu, gv = (w - period * (np.floor(w / period) + 0.5) for w in (u, v))
    return np.hypot(gu, gv) < 0.26 * r


def _outline(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, angle: float, **style) -> None:
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], **style)
    else:
        draw.polygon(polygon(shape, x, y, r, angle), **style)


def draw_object(canvas: Image.Image, obj: ToyObject) -> None:
    """Paint `obj` onto a supersampled canvas: flat, or in its dress (pattern, rim, centre disc)."""
    x, y, r = obj.x * SUPERSAMPLE, obj.y * SUPERSAMPLE, obj.radius * SUPERSAMPLE
    draw = ImageDraw.Draw(canvas)
    d = obj.dress
    if d is None:
        _outline(draw, obj.shape, x, y, r, obj.angle, fill=COLOURS[obj.colour])
        return
    n = canvas.size[0]
    shape = Image.new("L", (n, n))
    _outline(ImageDraw.Draw(shape), obj.shape, x, y, r, obj.angle, fill=255)
    fill = np.where(_pattern_mask(n, x, y, r, obj.angle, d.pattern)[..., None],
                    np.array(COLOURS[d.fill2], np.uint8), np.array(COLOURS[obj.colour], np.uint8))
    canvas.paste(Image.fromarray(fill.astype(np.uint8)), (0, 0), shape)
    _outline(draw, obj.shape, x, y, r, obj.angle, outline=COLOURS[d.outline], width=max(2, round(0.12 * r)))
    a = 0.3 * r
    draw.ellipse([x - a, y - a, x + a, y + a], fill=COLOURS[d.accent])


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) float in [-1, 1], the range the VAE and UNet are trained on."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


