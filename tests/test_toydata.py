"""The toy data: same pictures for the same (seed, split, index), captions true to labels, split disjoint."""

from __future__ import annotations

import numpy as np
import pytest

from blocklora.toy.concepts import BY_NAME
from blocklora.toy.data import (
    DRESSED_RATE,
    HELDOUT_PAIRS,
    TRAIN_PAIRS,
    ToyShapes,
    _pick_dress,
    caption_for,
    make_sample,
)
from blocklora.toy.vocabulary import COLOUR_NAMES, PATTERNS, SHAPES

N = 200


def test_same_seed_same_sample_other_seed_other_sample() -> None:
    a, b, c = make_sample(7, seed=3), make_sample(7, seed=3), make_sample(7, seed=4)
    assert a.caption == b.caption and a.objects == b.objects
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_caption_names_what_was_drawn(split: str) -> None:
    for i in range(N):
        s = make_sample(i, seed=1, split=split)
        assert s.image.size == (64, 64) and s.image.mode == "RGB"
        for obj in s.objects:
            assert f"{obj.colour} {obj.shape}" in s.caption
        assert s.caption.startswith("a ") or s.caption.startswith("an ")
        assert s.caption in {caption_for(s.objects, s.background, s.texture, size, bg)
                             for size in (True, False) for bg in (True, False)}
        assert s.background not in {c for o in s.objects for c in o.colours}
        if len(s.objects) == 2:
            assert s.main.size == "large" and s.objects[1].size == "small"


def test_dresses_are_common_unnamed_and_never_a_benchmark_concept() -> None:
    """The base sees many dresses, captions never say which, and no benchmark concept is ever drawn."""
    mains = [make_sample(i, seed=5).main for i in range(1000)]
    dressed = [o for o in mains if o.dress is not None]
    assert abs(len(dressed) / len(mains) - DRESSED_RATE) < 0.06
    assert {o.dress.pattern for o in dressed} == set(PATTERNS)
    assert all(len(set(o.colours)) == 4 for o in dressed)
    for i in range(N):
        s = make_sample(i, seed=5)
        assert not any(p in s.caption for p in (*PATTERNS, "outline", "accent"))
    # a red star has 630 possible dresses, one of them ember's: 5,000 draws would hit it about 8 times
    ember = BY_NAME["ember"]
    rng = np.random.default_rng(0)
    dresses = [_pick_dress(rng, "star", "red") for _ in range(5000)]
    assert len(set(dresses)) > 600
    assert all(("star", ("red", d.fill2), d.pattern, d.outline, d.accent) != ember.identity for d in dresses)


def test_heldout_pairs_never_in_training() -> None:
    assert not HELDOUT_PAIRS & set(TRAIN_PAIRS)
    assert len(HELDOUT_PAIRS) + len(TRAIN_PAIRS) == len(SHAPES) * len(COLOUR_NAMES)
    # every word still occurs in training, only the combinations are new
    assert {s for s, _ in TRAIN_PAIRS} == set(SHAPES) and {c for _, c in TRAIN_PAIRS} == set(COLOUR_NAMES)
    for i in range(N):
        train, held = make_sample(i, seed=2, split="train"), make_sample(i, seed=2, split="heldout")
        assert all((o.shape, o.colour) not in HELDOUT_PAIRS for o in train.objects)
        assert (held.main.shape, held.main.colour) in HELDOUT_PAIRS


def test_dataset_items() -> None:
    item = ToyShapes(4, seed=5)[2]
    assert tuple(item["pixel_values"].shape) == (3, 64, 64)
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert item["caption"] == make_sample(2, seed=5).caption
    assert SHAPES[item["shape"]] in item["caption"] and COLOUR_NAMES[item["colour"]] in item["caption"]


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        make_sample(0, split="test")
