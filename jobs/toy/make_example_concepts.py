"""Write examples/concepts/: toy concepts the toy base can learn, and photo concepts for real bases.

The toy concepts (TOY_EXAMPLES, from blocklora.toy.concepts.CONCEPTS; two of them stars) are what the
main job trains: four captioned pictures each, drawn by the generator. The photos come from
scikit-image's bundled photos that carry no copyright restriction (CC0 or public domain, as their
docstrings in skimage.data state), plus a procedural glyph; the toy base cannot draw those, they are
there for real Stable Diffusion bases. Everything is deterministic: re-running writes the same files.

    python jobs/toy/make_example_concepts.py [--out examples/concepts]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image, ImageDraw

from blocklora.toy.concepts import BY_NAME, write_concept_folder

SIZE = 64
# (name, class word, skimage.data function, licence note, crops as (centre y, centre x, side) in
# fractions of the photo's height/width/height, with a horizontal flip flag)
PHOTOS = (
    ("chelsea", "cat", "chelsea", "CC0 by the photographer (Stefan van der Walt)",
     [(0.5, 0.33, 1.0, False), (0.45, 0.35, 0.8, False), (0.5, 0.3, 0.9, True), (0.55, 0.38, 0.85, False),
      (0.5, 0.33, 1.0, True)]),
    ("espresso", "cup", "coffee", "CC0 by the photographer (Rachel Michetti)",
     [(0.5, 0.48, 1.0, False), (0.45, 0.48, 0.8, False), (0.5, 0.45, 0.9, True), (0.4, 0.5, 0.7, False),
      (0.5, 0.5, 1.0, True)]),
    ("falcon", "rocket", "rocket", "public domain (SpaceX photo, released into the public domain)",
     [(0.65, 0.5, 0.6, False), (0.6, 0.5, 0.7, False), (0.7, 0.5, 0.5, True), (0.65, 0.48, 0.65, False),
      (0.62, 0.52, 0.75, True)]),
)
TOY_EXAMPLES = ("ember", "frost", "lagoon", "rosa")  # jobs/main.py trains these (MAIN_CONCEPTS)
GLYPH = ("swirl", "symbol")  # a yellow spiral on navy: nothing in the toy data is curved like it


def crop(photo: np.ndarray, cy: float, cx: float, side: float, flip: bool) -> Image.Image:
    """Square crop (clamped inside the photo), area-downsampled to 64 px, optionally mirrored."""
    h, w = photo.shape[:2]
    s = int(side * h)
    top = int(np.clip(cy * h - s / 2, 0, h - s))
    left = int(np.clip(cx * w - s / 2, 0, w - s))
    im = Image.fromarray(photo[top:top + s, left:left + s]).resize((SIZE, SIZE), Image.Resampling.BOX)
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im


def swirl(turn: float, scale: float) -> Image.Image:
    """An Archimedean spiral of three turns, rotated by `turn` radians, drawn at 4x and downsampled."""
    n = SIZE * 4
    im = Image.new("RGB", (n, n), (20, 30, 80))
    t = np.linspace(0, 6 * np.pi, 400)
    r = scale * n * 0.42 * t / t[-1]
    pts = list(zip(n / 2 + r * np.cos(t + turn), n / 2 + r * np.sin(t + turn)))
    ImageDraw.Draw(im).line(pts, fill=(250, 200, 40), width=n // 20, joint="curve")
    return im.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def write_concept(folder: Path, name: str, class_word: str, images: list[Image.Image]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.save(folder / f"{i:02d}.png")
    (folder / "concept.json").write_text(json.dumps({"name": name, "class_word": class_word}, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "examples" / "concepts")
    args = ap.parse_args()
    lines = ["# Example concepts: sources and licences", "",
             "Written by `jobs/toy/make_example_concepts.py` (deterministic, 64x64). The toy concepts are what the",
             "main job trains on the toy base; the photos and the glyph are for real bases.", "",
             "| concept | class word | source | licence |", "|---|---|---|---|"]
    for name, class_word, func, licence, crops in PHOTOS:
        photo = getattr(skimage.data, func)()
        write_concept(args.out / name, name, class_word, [crop(photo, *c) for c in crops])
        lines.append(f"| {name} | {class_word} | `skimage.data.{func}()` (scikit-image {skimage.__version__}) "
                     f"| {licence} |")
    name, class_word = GLYPH
    write_concept(args.out / name, name, class_word, [swirl(k * np.pi / 2.5, 0.85 + 0.04 * k) for k in range(5)])
    lines.append(f"| {name} | {class_word} | procedural (`swirl()` in the script) | no third-party content |")
    for name in TOY_EXAMPLES:
        c = BY_NAME[name]
        write_concept_folder(c, args.out / name)
        lines.append(f"| {name} | {c.class_word} | `blocklora.toy.concepts` ({c.fill[0]}/{c.fill[1]} {c.pattern}, "
                     f"{c.outline} outline, {c.accent} accent; captions in the .txt files) | no third-party content |")
    (args.out / "SOURCE.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(PHOTOS) + 1 + len(TOY_EXAMPLES)} concepts to {args.out}")


if __name__ == "__main__":
    main()
