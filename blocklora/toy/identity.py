"""A judge of identity for toy concepts: the toy world's stand-in for CLIP-I and CLIP-T.

- `embed` maps a picture to a unit vector that describes the object's colours ring by ring: what
  sits at its centre (the accent), in its body (the fill pattern's two colours, in their
  proportions) and at its rim (the outline). The object is found as whatever is not the border's
  colour; rings are measured in units of its own radius. So two pictures of one concept agree
  whatever their position, size, turn and background, and two concepts differ wherever their
  colours or their arrangement differ.
- `image_alignment` is the CLIP-I protocol: per generated picture, the mean cosine to the concept's
  reference pictures.
- `text_alignment` is the CLIP-T analogue: does the picture show the size and background the rest
  of the prompt asked for? Background is read at the border, size from the object's extent.
- `shape_alignment` is what colours cannot say: does the object have the concept's silhouette? The
  colour descriptor scores a picture of the concept's palette with no shape at all (colour soup from
  an over-trained adapter, a blob) like the concept itself; the silhouette descriptor reads, ring by
  ring around the object's centre, how much of each angular sector it fills, keeps the magnitudes of
  that profile's angular harmonics (so a turned star is still a star) and subtracts their mean over
  random drawn identities (so what every compact object shares does not count).

It is a fixed descriptor, not a trained network, on purpose: identity in this world *is* colours by
region, so a descriptor cannot have learned the benchmark's concepts (every concept is unseen to it)
and it needs no training on a shared CPU. A CNN trained supervised-contrastively on random identities
for 600 steps (this session, ~10 CPU minutes) reached pair AUC 0.85-0.93; this descriptor reaches
>= 0.99 on clean drawn pictures and >= 0.95 on degraded ones (models/judge/README.md). Colours are
assigned softly to the toy palette, so blur and slight tints move the score smoothly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from blocklora.toy.concepts import CONCEPTS, Attributes, ToyConcept, draw_picture, random_concept, reference_pictures
from blocklora.toy.draw import SIZE, to_tensor
from blocklora.toy.judge import augment  # the shape/colour judge's blur, tint and noise
from blocklora.toy.vocabulary import COLOUR_NAMES, COLOURS, SIZES

SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
ImagesLike = torch.Tensor | Sequence[Image.Image]
PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255  # (8, 3) in COLOUR_NAMES order


@dataclass(frozen=True)
class IdentityJudge:
    """The descriptor's settings; every method takes PIL pictures or a (B, 3, H, W) tensor in [0, 1]."""

    temperature: float = 0.02  # of the soft palette assignment, in squared RGB distance ([0, 1] units)
    rings: tuple[float, ...] = (0.0, 0.45, 0.9, 1.4)  # ring edges in object radii: accent, body, rim
    size_threshold: float = 12.5  # px: object extent between the largest small and the smallest large
    size_softness: float = 0.8  # px
    min_object_px: float = 80.0  # object area below which a picture counts as partly empty (a small star: ~100)
    shape_rings: tuple[float, ...] = (0.0, 0.5, 0.8, 1.1, 1.5, 2.2, 3.5)  # object radii: core, arms, beyond
    sectors: int = 24  # angular sectors of the silhouette profile
    harmonics: int = 7  # angular harmonics kept per ring (0 = the ring's fill; 3, 4, 5 = triangle, cross, star)

    def _read(self, images: ImagesLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(palette probabilities (B, H, W, 8), background probabilities (B, 8), object weight (B, H, W),
        each pixel's distance from the object's centre (B, H, W))."""
        x = _as_input(images)
        b, _, h, w = x.shape
        p = torch.softmax(-((x.permute(0, 2, 3, 1)[..., None, :] - PALETTE) ** 2).sum(-1) / self.temperature, -1)
        background = torch.cat([p[:, 0], p[:, -1], p[:, :, 0], p[:, :, -1]], dim=1).mean(1)  # the border
        obj = (1 - (p * background[:, None, None, :]).sum(-1)).clamp_min(0)  # not the border's colour
        yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        mass = obj.sum((1, 2)).clamp_min(1e-6)
        cy, cx = (obj * yy).sum((1, 2)) / mass, (obj * xx).sum((1, 2)) / mass
        dist = ((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2).sqrt()  # (B, H, W)
        return p, background, obj, dist

    @torch.no_grad()
    def embed(self, images: ImagesLike) -> torch.Tensor:
        """(B, 8 * rings + 1) unit vectors: per ring, the square roots of the object's colour proportions
        (the border's colour left out), each ring normalised, then the whole; the last axis is "no
        object", so that a picture with only a speck on it does not match a concept by its colours."""
        p, background, obj, dist = self._read(images)
        radius = (obj.sum((1, 2)) / np.pi).sqrt().clamp_min(1.0)  # of a disc of the object's area
        r = dist / radius[:, None, None]
        colours = p * obj[..., None] * (1 - background)[:, None, None, :]  # (B, H, W, 8)
        parts = []
        for lo, hi in zip(self.rings[:-1], self.rings[1:]):
            ring = ((r >= lo) & (r < hi)).float()[..., None]
            hist = (colours * ring).sum((1, 2))  # (B, 8)
            parts.append(F.normalize((hist / hist.sum(1, keepdim=True).clamp_min(1e-6)).sqrt(), dim=1))
        presence = (obj.sum((1, 2)) / self.min_object_px).clamp(0, 1)[:, None]  # (B, 1)
        rings = F.normalize(torch.cat(parts, dim=1), dim=1)
        return F.normalize(torch.cat([rings * presence, 1 - presence], dim=1), dim=1)

    def image_alignment(self, generated: ImagesLike, references: ImagesLike) -> torch.Tensor:
        """(B,): each generated picture's mean cosine to the references (one concept's pictures)."""
        return (self.embed(generated) @ self.embed(references).T).mean(dim=1)

    @torch.no_grad()
    def silhouette(self, images: ImagesLike) -> torch.Tensor:
        """(B, rings x harmonics) unit vectors: the object's angular fill profile per ring, as harmonic
        magnitudes, minus their mean over random drawn identities (`_silhouette_mean`)."""
        return F.normalize(self._profile(images) - _silhouette_mean(self), dim=1)

    def _profile(self, images: ImagesLike) -> torch.Tensor:
        """(B, rings x harmonics): per ring, |rfft| over the sectors of the share of each sector the object fills."""
        _, _, obj, dist = self._read(images)
        h, w = obj.shape[1:]
        yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        mass = obj.sum((1, 2)).clamp_min(1e-6)
        cy, cx = (obj * yy).sum((1, 2)) / mass, (obj * xx).sum((1, 2)) / mass
        r = dist / (mass / np.pi).sqrt().clamp_min(1.0)[:, None, None]  # in radii of a disc of its area
        angle = torch.atan2(yy - cy[:, None, None], xx - cx[:, None, None])  # (B, H, W)
        sector = F.one_hot(((angle + np.pi) / (2 * np.pi) * self.sectors).long().clamp(0, self.sectors - 1),
                           self.sectors).float()  # (B, H, W, K)
        parts = []
        for lo, hi in zip(self.shape_rings[:-1], self.shape_rings[1:]):
            cells = sector * ((r >= lo) & (r < hi)).float()[..., None]
            fill = (cells * obj[..., None]).sum((1, 2)) / cells.sum((1, 2)).clamp_min(1.0)  # (B, K) in [0, 1]
            parts.append(torch.fft.rfft(fill, dim=1).abs()[:, :self.harmonics] / self.sectors)
        return torch.cat(parts, dim=1)

    def shape_alignment(self, generated: ImagesLike, references: ImagesLike) -> torch.Tensor:
        """(B,): each generated picture's mean silhouette cosine to the references; ~0 for a shape
        unlike the concept's (or none), ~0.7-0.8 for another drawn picture of it."""
        return (self.silhouette(generated) @ self.silhouette(references).T).mean(dim=1)

    @torch.no_grad()
    def attribute_probs(self, images: ImagesLike) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 8) background-colour and (B, 2) size probabilities, in COLOUR_NAMES / SIZE_NAMES order.

        Size reads the object's extent: the distance from its centre within which 90% of it lies."""
        p, background, obj, dist = self._read(images)
        order = dist.flatten(1).argsort(dim=1)
        weight = obj.flatten(1).gather(1, order).cumsum(1)
        inside = (weight < 0.9 * weight[:, -1:]).sum(1, keepdim=True).clamp_max(order.shape[1] - 1)
        extent = dist.flatten(1).gather(1, order).gather(1, inside)[:, 0]  # (B,)
        large = torch.sigmoid((extent - self.size_threshold) / self.size_softness)
        return background, torch.stack([1 - large, large], dim=1)  # SIZE_NAMES is ("small", "large")

    def text_alignment(self, images: ImagesLike, attributes: Attributes | Sequence[Attributes]) -> torch.Tensor:
        """(B,): mean of the probabilities of the asked background and of the asked size."""
        bg, size = self.attribute_probs(images)
        attrs = [attributes] * bg.shape[0] if isinstance(attributes, Attributes) else list(attributes)
        if len(attrs) != bg.shape[0]:
            raise ValueError(f"{bg.shape[0]} images but {len(attrs)} attributes; give one, or one per image")
        rows = torch.arange(bg.shape[0])
        asked_bg = torch.tensor([COLOUR_NAMES.index(a.background) for a in attrs])
        asked_size = torch.tensor([SIZE_NAMES.index(a.size) for a in attrs])
        return (bg[rows, asked_bg] + size[rows, asked_size]) / 2

    def predict_attributes(self, images: ImagesLike) -> list[Attributes]:
        bg, size = self.attribute_probs(images)
        return [Attributes(SIZE_NAMES[s], COLOUR_NAMES[b])
                for b, s in zip(bg.argmax(1).tolist(), size.argmax(1).tolist())]


@functools.cache
def _silhouette_mean(judge: IdentityJudge) -> torch.Tensor:
    """The mean silhouette profile of 128 drawn pictures of 64 random identities (fixed seeds; none is
    a benchmark concept), so the descriptor centres on what an ordinary drawn object looks like."""
    pictures = [im for c in random_identities(64, seed=99) for im in reference_pictures(c, 2, seed=5)]
    return judge._profile(pictures).mean(dim=0)


def load_identity_judge() -> IdentityJudge:
    """The judge with the settings models/judge/README.md validates."""
    return IdentityJudge()


def _as_input(images: ImagesLike) -> torch.Tensor:
    """PIL list or (B, 3, H, W) tensor in [0, 1] -> (B, 3, 64, 64) in [0, 1] on CPU."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images tensor must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        x = images.detach().float().cpu()
        if x.shape[-2:] != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        return x.clamp(0, 1)
    if len(images) == 0:
        raise ValueError("no images given")
    return (to_tensor([im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR) for im in images]) + 1) / 2


# -- validation -------------------------------------------------------------------------------------

def degrade(x: torch.Tensor, seed: int) -> torch.Tensor:
    """(B, 3, 64, 64) in [0, 1] -> roughly what the toy base does to a picture: a smooth warp of up to
    ~2 px (edges wander, shapes go blobby), blur (sigma up to 1.5 px), tint, brightness and pixel noise,
    and for half the batch a 2x down-and-up resample."""
    g = torch.Generator().manual_seed(seed)
    b = x.shape[0]
    flow = F.interpolate(torch.randn(b, 2, 4, 4, generator=g), size=(SIZE, SIZE), mode="bicubic",
                         align_corners=False) * (torch.rand(b, 1, 1, 1, generator=g) * 4.0 / SIZE)
    grid = F.affine_grid(torch.eye(2, 3).expand(b, 2, 3), list(x.shape), align_corners=False)
    x = F.grid_sample(x * 2 - 1, grid + flow.permute(0, 2, 3, 1), padding_mode="border", align_corners=False)
    x = augment(x, g)
    low = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True), size=(SIZE, SIZE),
                        mode="bilinear")
    pick = (torch.rand(b, 1, 1, 1, generator=g) < 0.5).float()
    return ((pick * low + (1 - pick) * x).clamp(-1, 1) + 1) / 2


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve: the chance a random positive outscores a random negative (ties half)."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None]).float().mean()
    ties = (pos[:, None] == neg[None]).float().mean()
    return float(greater + ties / 2)


def pair_auc(judge: IdentityJudge, concepts: Sequence[ToyConcept], per_concept: int, seed: int,
             degraded: bool = False, same_class_only: bool = False, silhouette: bool = False) -> float:
    """Same-concept vs different-concept AUC of the cosine over every pair of fresh drawn pictures.

    With `degraded` the pictures first go through `degrade`; with `same_class_only` the negatives are
    only pairs of different concepts that share a class word (three stars: the hard case). With
    `silhouette` the cosine is the shape descriptor's and a pair is positive when the two share a
    class word (a shape, whatever its colours)."""
    x = (to_tensor([im for c in concepts for im in reference_pictures(c, per_concept, seed)]) + 1) / 2
    x = degrade(x, seed) if degraded else x
    z = judge.silhouette(x) if silhouette else judge.embed(x)
    classes = [c.class_word for c in concepts for _ in range(per_concept)]
    labels = (torch.tensor([sorted(set(classes)).index(k) for k in classes]) if silhouette
              else torch.arange(len(concepts)).repeat_interleave(per_concept))
    keep = torch.triu(torch.ones(len(z), len(z), dtype=torch.bool), diagonal=1)
    if same_class_only:
        keep &= torch.tensor([[a == b for b in classes] for a in classes])
    return auc((z @ z.T)[keep], (labels[:, None] == labels[None])[keep])


def random_identities(count: int, seed: int) -> list[ToyConcept]:
    """Fresh random identities (none of them one of CONCEPTS)."""
    rng = np.random.default_rng([seed, 7])
    return [random_concept(rng, f"random-{k}") for k in range(count)]


@dataclass(frozen=True)
class Check:
    """One validation number: what was measured, on how many identities, clean and degraded."""

    name: str
    identities: int
    clean: float
    degraded: float


def attribute_accuracy(judge: IdentityJudge, concepts: Sequence[ToyConcept], per_concept: int, seed: int,
                       degraded: bool) -> tuple[float, float]:
    """(background, size) accuracy on fresh drawn pictures with random layouts and plain backgrounds."""
    rng = np.random.default_rng([seed, 3])
    pictures = [draw_picture(c, rng) for c in concepts for _ in range(per_concept)]
    x = (to_tensor([p.image for p in pictures]) + 1) / 2
    predicted = judge.predict_attributes(degrade(x, seed) if degraded else x)
    truth = [p.attributes for p in pictures]
    return (float(np.mean([p.background == t.background for p, t in zip(predicted, truth)])),
            float(np.mean([p.size == t.size for p, t in zip(predicted, truth)])))


def validate(judge: IdentityJudge, count: int = 48, per_concept: int = 4, seed: int = 11) -> list[Check]:
    """The judge on fresh drawn pictures: pair AUC on random identities and on the benchmark's CONCEPTS
    (all pairs, then only negatives that share a class word), then the attribute readouts' accuracy."""
    randoms = random_identities(count, seed)
    checks = [Check(name, len(cs), pair_auc(judge, cs, per_concept, seed, False, same_class),
                    pair_auc(judge, cs, per_concept, seed, True, same_class))
              for name, cs, same_class in (("pair AUC, random identities", randoms, False),
                                           ("pair AUC, benchmark CONCEPTS", CONCEPTS, False),
                                           ("pair AUC, CONCEPTS, negatives of the same class word", CONCEPTS, True))]
    checks.append(Check("shape pair AUC (silhouette; positive = same class word), random identities", len(randoms),
                        pair_auc(judge, randoms, per_concept, seed, silhouette=True),
                        pair_auc(judge, randoms, per_concept, seed, True, silhouette=True)))
    clean, degraded = (attribute_accuracy(judge, randoms, per_concept, seed, d) for d in (False, True))
    checks.append(Check("background accuracy, random identities", len(randoms), clean[0], degraded[0]))
    checks.append(Check("size accuracy, random identities", len(randoms), clean[1], degraded[1]))
    return checks
