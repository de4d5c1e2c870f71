"""The toy world's words: what its captions name. No imports, so a config can name them (the toy
recipe's quiet classes) without loading the drawing code, torch or numpy."""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (245, 140, 25), "yellow": (240, 215, 35), "green": (40, 165, 65),
    "blue": (40, 85, 215), "purple": (140, 55, 185), "white": (242, 242, 242), "black": (22, 22, 22),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SIZES: dict[str, tuple[float, float]] = {"small": (0.13, 0.17), "large": (0.26, 0.33)}  # radius / SIZE
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted")
PATTERNS: tuple[str, ...] = ("stripes", "dots", "checks")  # a dressed object's fill
