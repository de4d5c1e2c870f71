"""The concepts and identity judge the retention benchmark scores with, behind one small interface.

Concepts are `blocklora.toy.concepts` (16 identities, several per class word). The judge is
`blocklora.toy.identity` (CLIP-I / CLIP-T analogues); shape alignment is always its silhouette
descriptor, whichever judge scores identity. The interim judge the first results were
scored with stays selectable (`--judge interim`): the toy shape/colour judge's pooled features as
the embedding and, for text alignment, the share of border pixels nearest the asked background
colour (size not checked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from blocklora.toy import concepts as toy
from blocklora.toy.concepts import Attributes, ToyConcept
from blocklora.toy.draw import SIZE
from blocklora.toy.identity import load_identity_judge
from blocklora.toy.judge import load_judge
from blocklora.toy.vocabulary import COLOUR_NAMES, COLOURS


class Judge(Protocol):
    def image_alignment(self, generated: torch.Tensor, references: Sequence[Image.Image]) -> torch.Tensor: ...

    def text_alignment(self, generated: torch.Tensor, attributes: Attributes) -> torch.Tensor: ...


class World:
    """The benchmark's concepts, their pictures and prompts, and the judge that scores generations."""

    def __init__(self, judge: Judge) -> None:
        self.concepts: list[ToyConcept] = list(toy.CONCEPTS)
        self.judge = judge
        self.shapes = load_identity_judge()  # the silhouette descriptor: fixed, nothing to choose
        self.name = type(judge).__name__

    def training(self, c: ToyConcept) -> list[tuple[Image.Image, str]]:
        """The client's pictures with captions in the trainer's '{trigger}' form."""
        return [(p.image, p.caption(c)) for p in toy.training_samples(c)]

    def write_training(self, c: ToyConcept, folder: Path) -> None:
        """The client's pictures as a client's folder holds them: k.png beside its caption k.txt."""
        for k, (pic, caption) in enumerate(self.training(c)):
            pic.save(folder / f"{k}.png")
            (folder / f"{k}.txt").write_text(caption)

    def references(self, c: ToyConcept, count: int, seed: int) -> list[Image.Image]:
        return toy.reference_pictures(c, count, seed)

    def identity_attributes(self, c: ToyConcept) -> Attributes:
        """The image-alignment prompt's attributes: large, on a background the training pictures lack."""
        return toy.eval_attributes(c, 1)[0]

    def text_attributes(self, c: ToyConcept) -> Attributes:
        """The text-alignment prompt's attributes: small, on yet another background."""
        return toy.eval_attributes(c, 3)[2]

    def instance_prompt(self, c: ToyConcept, trigger: str, attrs: Attributes) -> str:
        return toy.caption(c, attrs).replace("{trigger}", trigger)

    def class_prompt(self, c: ToyConcept, attrs: Attributes) -> str:
        return toy.class_prompt(c, attrs)

    def image_alignment(self, generated: torch.Tensor, references: Sequence[Image.Image]) -> torch.Tensor:
        """(B,): each generated picture ((B, 3, H, W) in [0, 1]) against every reference."""
        return self.judge.image_alignment(generated, references)

    def text_alignment(self, generated: torch.Tensor, attrs: Attributes) -> torch.Tensor:
        return self.judge.text_alignment(generated, attrs)

    def shape_alignment(self, generated: torch.Tensor, references: Sequence[Image.Image]) -> torch.Tensor:
        """(B,): does the object have the concept's silhouette (colours aside)? ~0: not its shape."""
        return self.shapes.shape_alignment(generated, references)


def load_world(judge: str = "identity") -> World:
    """`judge`: "identity" (blocklora.toy.identity, the default) or "interim" (what the committed
    small-profile results in docs/results were scored with, before the identity judge landed)."""
    if judge == "identity":
        return World(load_identity_judge())
    if judge == "interim":
        return World(InterimJudge())
    raise ValueError(f"unknown judge {judge!r}; use 'identity' or 'interim'")


def to_unit(pictures: Sequence[Image.Image]) -> torch.Tensor:
    """PIL pictures -> (B, 3, H, W) in [0, 1]."""
    return torch.stack([torch.from_numpy(np.asarray(p.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                        for p in pictures])


class InterimJudge:
    """The toy (shape, colour) judge's features as an identity embedding, until the identity judge lands."""

    def __init__(self) -> None:
        self.net = load_judge()

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.float(), size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        return F.normalize(self.net.eval().pooled(x * 2 - 1), dim=1)

    @torch.no_grad()
    def image_alignment(self, generated: torch.Tensor, references: Sequence[Image.Image]) -> torch.Tensor:
        return (self._features(generated) @ self._features(to_unit(references)).T).mean(1)

    @torch.no_grad()
    def text_alignment(self, generated: torch.Tensor, attrs: Attributes) -> torch.Tensor:
        palette = torch.tensor([COLOURS[n] for n in COLOUR_NAMES], dtype=torch.float32) / 255  # (8, 3)
        edge = 4
        border = torch.cat([generated[..., :edge, :].flatten(2), generated[..., -edge:, :].flatten(2),
                            generated[..., edge:-edge, :edge].flatten(2),
                            generated[..., edge:-edge, -edge:].flatten(2)], 2)
        nearest = torch.cdist(border.transpose(1, 2).float(), palette[None]).argmin(-1)  # (B, P)
        return (nearest == COLOUR_NAMES.index(attrs.background)).float().mean(1)
