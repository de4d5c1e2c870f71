"""CLIP alignment plumbing with a randomly initialised open_clip model (nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.evaluation import ClipScorer, class_prompt, to_pil


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    torch.manual_seed(0)
    return ClipScorer("ViT-S-32", pretrained=None)


def _images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("prompt,triggers,expected", [
    ("a photo of <blk3> dog", ("<blk3>",), "a photo of dog"),
    ("<blk3> dog on a beach", ("<blk3>",), "dog on a beach"),
    ("a <blk3> in the snow", ("<blk3>",), "a dog in the snow"),
    ("a photo of <blk1> <blk1_1> dog", ("<blk1>", "<blk1_1>"), "a photo of dog"),
    ("a photo of <blk12> dog", ("<blk1>",), "a photo of <blk12> dog"),  # another slot's token stays
])
def test_class_prompt_replaces_triggers_by_the_class_word(prompt, triggers, expected):
    assert class_prompt(prompt, triggers, "dog") == expected


def test_embeddings_are_unit_vectors(scorer):
    img = scorer.embed_images(_images(3, 0))
    txt = scorer.embed_texts(["a photo of dog", "a cat"])
    assert img.shape[0] == 3 and txt.shape[0] == 2 and img.shape[1] == txt.shape[1]
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))


def test_identical_images_align_perfectly(scorer):
    imgs = _images(1, 1)
    assert scorer.image_alignment(imgs, imgs) == pytest.approx(1.0, abs=1e-5)


def test_scores_are_cosines_over_all_pairs(scorer):
    gen, refs = _images(2, 2), _images(3, 3)
    s = scorer.score(gen, refs, "a photo of <blk0> dog", ("<blk0>",), "dog")
    assert set(s) == {"image_alignment", "text_alignment"}
    assert all(-1.0 <= v <= 1.0 for v in s.values())
    pairs = scorer.embed_images(gen) @ scorer.embed_images(refs).T  # (2, 3)
    assert s["image_alignment"] == pytest.approx(float(pairs.mean()), abs=1e-6)
    assert s["text_alignment"] == pytest.approx(scorer.text_alignment(gen, "a photo of dog"), abs=1e-6)


def test_tensor_array_and_pil_inputs_agree(scorer):
    pil = _images(1, 4)[0]
    arr = np.array(pil)
    ten = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    assert to_pil(arr).tobytes() == pil.tobytes() == to_pil(ten).tobytes()
