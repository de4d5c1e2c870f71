"""Toy concepts: identities the toy base cannot draw from words but can learn from four pictures.

A concept is a shape the base knows (its class word, e.g. "star") dressed in an identity no caption
of the base's training data names: a two-colour fill pattern (stripes, dots or checks), an outline
colour and a central accent disc. Several concepts share a class word, so a merged concept can pull
"a large star" toward itself (the paper's prior-class problem) and two stars must stay apart.

Every picture is a pure function of (identity, stream, index): the training pictures, the held-out
picture and the reference pictures for image alignment are the same on every machine. Pictures
put the concept on plain backgrounds of colours it does not use, and their captions name size and
background, so a prompt such as "a small {ember} on a green background" asks for something the
judge's heads can check (text alignment) beside the identity (image alignment).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from blocklora.toy.draw import SIZE, SUPERSAMPLE, Dress, ToyObject, article, draw_background, draw_object
from blocklora.toy.vocabulary import COLOUR_NAMES, COLOURS, PATTERNS, SHAPES, SIZES

TRAINING_COUNT = 4  # pictures a client trains on; picture TRAINING_COUNT of the same stream is held out
TRAINING_SIZES = ("large", "large", "small", "large")  # mostly large: the pattern needs pixels


@dataclass(frozen=True)
class ToyConcept:
    """One identity: what a client's four pictures share, whatever their layout and background."""

    name: str
    class_word: str  # a shape of blocklora.toy.data.SHAPES: the base knows the word
    fill: tuple[str, str]  # the pattern's two colours
    pattern: str  # one of PATTERNS
    outline: str  # colour of the rim
    accent: str  # colour of the disc at the centre

    def __post_init__(self) -> None:
        if self.class_word not in SHAPES:
            raise ValueError(f"class word {self.class_word!r} is not a shape the toy base knows: {SHAPES}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern {self.pattern!r} is not one of {PATTERNS}")
        colours = (*self.fill, self.outline, self.accent)
        unknown = [c for c in colours if c not in COLOURS]
        if unknown:
            raise ValueError(f"unknown colour(s) {unknown}; known: {COLOUR_NAMES}")
        if len(set(colours)) != 4:
            raise ValueError(f"{self.name}: fill, outline and accent must be four different colours, got {colours}")

    @property
    def identity(self) -> tuple:
        """Everything that makes the concept itself (its name is only a label)."""
        return (self.class_word, self.fill, self.pattern, self.outline, self.accent)

    def as_object(self, size: str, x: float, y: float, radius: float, angle: float) -> ToyObject:
        """The concept as the base's data would draw it: its class shape wearing its dress."""
        return ToyObject(self.class_word, self.fill[0], size, x, y, radius, angle,
                         Dress(self.fill[1], self.pattern, self.outline, self.accent))

    @property
    def backgrounds(self) -> tuple[str, ...]:
        """Colours the concept does not wear, so it always stands out from its background."""
        return tuple(c for c in COLOUR_NAMES if c not in (*self.fill, self.outline, self.accent))


@dataclass(frozen=True)
class Attributes:
    """What a prompt asks for besides the concept: the things text alignment checks."""

    size: str  # "small" | "large"
    background: str  # a colour name

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size {self.size!r} is not one of {tuple(SIZES)}")
        if self.background not in COLOURS:
            raise ValueError(f"background {self.background!r} is not one of {COLOUR_NAMES}")


def caption(c: ToyConcept, attrs: Attributes) -> str:
    """A training caption in the trainer's form: '{trigger}' stands where the trigger tokens go."""
    return f"a {attrs.size} {{trigger}} {c.class_word} on {article(attrs.background + ' background')}"


def instance_prompt(c: ToyConcept, attrs: Attributes) -> str:
    """The prompt that asks for the concept, in blocklora.pipeline.prompts form: '{name}' -> trigger + class word."""
    return f"a {attrs.size} {{{c.name}}} on {article(attrs.background + ' background')}"


def class_prompt(c: ToyConcept, attrs: Attributes) -> str:
    """The same prompt with the class word instead of the concept: what prior drift is measured on."""
    return f"a {attrs.size} {c.class_word} on {article(attrs.background + ' background')}"


def eval_attributes(c: ToyConcept, count: int) -> list[Attributes]:
    """`count` evaluation prompts' attributes: large first, backgrounds cycling through the free colours
    from the far end. A concept of four colours has four free ones and its training pictures show all
    four, so these backgrounds are seen ones: what is asked of the concept is itself, not a new scene."""
    free = c.backgrounds[::-1]
    return [Attributes("large" if k % 3 != 2 else "small", free[k % len(free)]) for k in range(count)]


@dataclass(frozen=True)
class ConceptPicture:
    image: Image.Image
    attributes: Attributes

    def caption(self, c: ToyConcept) -> str:
        return caption(c, self.attributes)


def _rng(c: ToyConcept, stream: str, index: int) -> np.random.Generator:
    key = zlib.crc32(repr((c.identity, stream)).encode())  # stable across runs and machines, unlike hash()
    return np.random.default_rng([key, index])


def render(c: ToyConcept, attrs: Attributes, x: float, y: float, radius: float, angle: float,
           texture: str = "plain", rng: np.random.Generator | None = None) -> Image.Image:
    """The concept at (x, y) with `radius` (pixels of the 64 px picture), turned by `angle` radians."""
    canvas = Image.new("RGB", (SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE))
    draw_background(ImageDraw.Draw(canvas), attrs.background, texture, rng or np.random.default_rng(0))
    draw_object(canvas, c.as_object(attrs.size, x, y, radius, angle))
    return canvas.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def draw_picture(c: ToyConcept, rng: np.random.Generator, size: str | None = None, background: str | None = None,
                 texture: str = "plain") -> ConceptPicture:
    """One picture with a random layout: position, radius within `size`, a turn of up to ~0.6 rad."""
    size = size or ("large" if rng.random() < 0.75 else "small")
    background = background or str(rng.choice(c.backgrounds))
    attrs = Attributes(size, background)
    radius = float(rng.uniform(*SIZES[size])) * SIZE
    margin = radius * 1.1 + 1
    x, y = (float(rng.uniform(margin, SIZE - margin)) for _ in range(2))
    angle = float(np.clip(rng.normal(0, 0.3), -0.6, 0.6))
    return ConceptPicture(render(c, attrs, x, y, radius, angle, texture, rng), attrs)


def training_samples(c: ToyConcept) -> list[ConceptPicture]:
    """The client's pictures: four different backgrounds, three large and one small."""
    rng = _rng(c, "train", 0)
    backgrounds = rng.permutation(c.backgrounds)
    return [draw_picture(c, _rng(c, "train", k + 1), TRAINING_SIZES[k], str(backgrounds[k]))
            for k in range(TRAINING_COUNT)]


def training_pictures(c: ToyConcept) -> list[Image.Image]:
    return [p.image for p in training_samples(c)]


def heldout_sample(c: ToyConcept) -> ConceptPicture:
    """A fifth picture of the training stream, never trained on: large, in a layout of its own, on the
    background that the training set shows only behind the small picture."""
    small = TRAINING_SIZES.index("small")
    return draw_picture(c, _rng(c, "train", TRAINING_COUNT + 1), "large",
                        training_samples(c)[small].attributes.background)


def heldout_picture(c: ToyConcept) -> Image.Image:
    return heldout_sample(c).image


def drawn_pictures(c: ToyConcept, attrs: Attributes, count: int) -> list[Image.Image]:
    """Fresh pictures of the concept as a prompt with `attrs` asks for it, in a stream of their own:
    what a model that had learned the concept perfectly would draw for that prompt."""
    return [draw_picture(c, _rng(c, "drawn", k), attrs.size, attrs.background).image for k in range(count)]


def reference_pictures(c: ToyConcept, count: int, seed: int = 0) -> list[Image.Image]:
    """Fresh pictures of the concept, disjoint from the training stream: image alignment's references."""
    return [draw_picture(c, _rng(c, f"reference-{seed}", k)).image for k in range(count)]


def random_concept(rng: np.random.Generator, name: str = "random") -> ToyConcept:
    """A random identity that is none of CONCEPTS (the judge trains on these, never on the benchmark)."""
    while True:
        colours = [str(x) for x in rng.choice(COLOUR_NAMES, size=4, replace=False)]
        c = ToyConcept(name, str(rng.choice(SHAPES)), (colours[0], colours[1]), str(rng.choice(PATTERNS)),
                       colours[2], colours[3])
        if c.identity not in IDENTITIES:
            return c


def write_concept_folder(c: ToyConcept, folder: str | Path) -> Path:
    """The folder a client trains from (blocklora.training.data.load_concept_images): 00.png..03.png with
    same-name .txt captions, and concept.json with the name, class word and identity."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for k, p in enumerate(training_samples(c)):
        p.image.save(folder / f"{k:02d}.png")
        (folder / f"{k:02d}.txt").write_text(p.caption(c) + "\n")
    info = {"name": c.name, "class_word": c.class_word, "fill": list(c.fill), "pattern": c.pattern,
            "outline": c.outline, "accent": c.accent}
    (folder / "concept.json").write_text(json.dumps(info, indent=1) + "\n")
    return folder


def concept_from_json(path: str | Path) -> ToyConcept:
    """The ToyConcept a folder's concept.json describes (KeyError names a missing field)."""
    d = json.loads(Path(path).read_text())
    return ToyConcept(d["name"], d["class_word"], tuple(d["fill"]), d["pattern"], d["outline"], d["accent"])


# The benchmark's concepts: three stars, three hearts, three circles, three squares, two triangles,
# two crosses. Same-class concepts differ in every part of their identity.
CONCEPTS: tuple[ToyConcept, ...] = (
    ToyConcept("ember", "star", ("red", "yellow"), "stripes", "black", "white"),
    ToyConcept("frost", "star", ("blue", "white"), "dots", "purple", "yellow"),
    ToyConcept("moss", "star", ("green", "black"), "checks", "orange", "red"),
    ToyConcept("rosa", "heart", ("purple", "white"), "stripes", "green", "yellow"),
    ToyConcept("tiger", "heart", ("orange", "black"), "dots", "white", "blue"),
    ToyConcept("candy", "heart", ("red", "white"), "checks", "blue", "green"),
    ToyConcept("lagoon", "circle", ("blue", "yellow"), "checks", "red", "white"),
    ToyConcept("plum", "circle", ("purple", "orange"), "dots", "black", "green"),
    ToyConcept("zebra", "circle", ("white", "black"), "stripes", "red", "yellow"),
    ToyConcept("pixel", "square", ("yellow", "black"), "checks", "blue", "red"),
    ToyConcept("mint", "square", ("green", "white"), "dots", "purple", "orange"),
    ToyConcept("dune", "square", ("orange", "purple"), "stripes", "green", "white"),
    ToyConcept("spark", "triangle", ("yellow", "blue"), "stripes", "red", "black"),
    ToyConcept("reef", "triangle", ("red", "green"), "dots", "white", "purple"),
    ToyConcept("ink", "cross", ("black", "white"), "checks", "yellow", "orange"),
    ToyConcept("flame", "cross", ("orange", "green"), "dots", "purple", "white"),
)
BY_NAME: dict[str, ToyConcept] = {c.name: c for c in CONCEPTS}
IDENTITIES: frozenset[tuple] = frozenset(c.identity for c in CONCEPTS)  # never drawn in the base's data
