"""The identity judge: tells concepts apart on fresh pictures (the benchmark's and random identities,
clean and degraded), and reads the size and background a prompt asked for."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blocklora.toy.concepts import CONCEPTS, draw_picture, heldout_picture, reference_pictures
from blocklora.toy.draw import to_tensor
from blocklora.toy.identity import load_identity_judge, pair_auc, random_identities

AUC_BAR = 0.95


@pytest.fixture(scope="module")
def judge():
    return load_identity_judge()


def test_embeddings_are_unit_vectors_from_pil_or_tensor(judge) -> None:
    images = reference_pictures(CONCEPTS[0], 3, seed=5)
    z = judge.embed(images)
    assert z.shape[0] == 3 and torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(z, judge.embed((to_tensor(images) + 1) / 2), atol=1e-4)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        judge.embed(torch.zeros(3, 64, 64))


def test_benchmark_concepts_are_told_apart(judge) -> None:
    assert pair_auc(judge, CONCEPTS, per_concept=3, seed=123) >= AUC_BAR
    assert pair_auc(judge, CONCEPTS, per_concept=3, seed=123, same_class_only=True) >= AUC_BAR


def test_random_identities_are_told_apart_even_degraded(judge) -> None:
    randoms = random_identities(16, seed=321)
    assert pair_auc(judge, randoms, per_concept=3, seed=321) >= AUC_BAR
    assert pair_auc(judge, randoms, per_concept=3, seed=321, degraded=True) >= 0.9


def test_image_alignment_prefers_the_concept(judge) -> None:
    refs = reference_pictures(CONCEPTS[0], 6, seed=1)
    own = judge.image_alignment([heldout_picture(CONCEPTS[0])], refs)
    others = judge.image_alignment([heldout_picture(c) for c in CONCEPTS[1:]], refs)
    assert own.shape == (1,) and others.shape == (len(CONCEPTS) - 1,)
    assert float(own[0]) > float(others.max())


def test_text_alignment_reads_background_and_size(judge) -> None:
    rng = np.random.default_rng(9)
    pictures = [draw_picture(c, rng) for c in CONCEPTS for _ in range(2)]
    right = judge.text_alignment([p.image for p in pictures], [p.attributes for p in pictures])
    wrong_bg = [type(p.attributes)(p.attributes.size, next(b for b in p_c.backgrounds if b != p.attributes.background))
                for p, p_c in zip(pictures, [c for c in CONCEPTS for _ in range(2)])]
    wrong = judge.text_alignment([p.image for p in pictures], wrong_bg)
    assert float(right.mean()) > 0.8 and float((right > wrong).float().mean()) > 0.9
    with pytest.raises(ValueError, match="attributes"):
        judge.text_alignment([p.image for p in pictures], [pictures[0].attributes] * 3)


def _colour_soup(x: torch.Tensor, cell: int = 4, seed: int = 0) -> torch.Tensor:
    """(B, 3, H, W) -> the same pixels in shuffled cell x cell blocks: the concept's palette and
    proportions with no shape, what an over-trained adapter on a base that cannot draw the shape paints."""
    b, c, h, w = x.shape
    blocks = x.unfold(2, cell, cell).unfold(3, cell, cell).reshape(b, c, (h // cell) * (w // cell), cell, cell)
    blocks = blocks[:, :, torch.randperm(blocks.shape[2], generator=torch.Generator().manual_seed(seed))]
    return blocks.reshape(b, c, h // cell, w // cell, cell, cell).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


def test_silhouette_tells_shapes_apart(judge) -> None:
    z = judge.silhouette(reference_pictures(CONCEPTS[0], 3, seed=5))
    assert z.shape[0] == 3 and torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    randoms = random_identities(16, seed=321)
    # small objects: few pixels of shape
    assert pair_auc(judge, randoms, per_concept=3, seed=321, silhouette=True) >= 0.85
    assert pair_auc(judge, CONCEPTS, per_concept=3, seed=123, silhouette=True) >= 0.9


def test_shape_alignment_tells_the_concept_from_its_colours_without_its_shape(judge) -> None:
    """The colour descriptor alone scores a shuffled picture of the concept far above other concepts;
    the silhouette scores it below every held-out drawn picture of its concept."""
    held, soup = [], []
    for c in CONCEPTS:
        refs = reference_pictures(c, 8, seed=0)
        x = (to_tensor([heldout_picture(c)]) + 1) / 2
        held.append(float(judge.shape_alignment(x, refs)[0]))
        soup.append(float(judge.shape_alignment(_colour_soup(x), refs)[0]))
    assert min(held) > 0.45 > 0.2 > max(soup), (held, soup)
