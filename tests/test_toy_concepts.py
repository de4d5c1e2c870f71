"""The toy concepts: fixed, distinct identities, shared class words, deterministic pictures, captions
a client folder can train from."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from blocklora.toy.concepts import (
    CONCEPTS,
    TRAINING_COUNT,
    Attributes,
    ToyConcept,
    caption,
    class_prompt,
    concept_from_json,
    heldout_picture,
    instance_prompt,
    random_concept,
    reference_pictures,
    training_pictures,
    training_samples,
    write_concept_folder,
)
from blocklora.toy.vocabulary import COLOURS, SHAPES
from blocklora.training.data import load_concept_images


def _same(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def test_benchmark_concepts_are_distinct_and_share_class_words() -> None:
    assert len(CONCEPTS) >= 16
    assert len({c.name for c in CONCEPTS}) == len(CONCEPTS)
    assert len({c.identity for c in CONCEPTS}) == len(CONCEPTS)
    per_class = Counter(c.class_word for c in CONCEPTS)
    assert per_class["star"] >= 3 and per_class["heart"] >= 3
    assert set(per_class) <= set(SHAPES)


def test_pictures_are_deterministic_and_differ_by_stream() -> None:
    c = CONCEPTS[0]
    a, b = training_pictures(c), training_pictures(c)
    assert len(a) == TRAINING_COUNT and all(_same(x, y) for x, y in zip(a, b))
    assert all(im.size == (64, 64) and im.mode == "RGB" for im in a)
    held, refs = heldout_picture(c), reference_pictures(c, 3, seed=0)
    assert not any(_same(held, x) for x in a)
    assert all(_same(x, y) for x, y in zip(refs, reference_pictures(c, 3, seed=0)))
    assert not _same(refs[0], reference_pictures(c, 1, seed=1)[0])
    assert not any(_same(r, x) for r in refs for x in a)


def test_training_pictures_vary_and_captions_name_the_rest() -> None:
    for c in CONCEPTS:
        samples = training_samples(c)
        assert len({s.attributes.background for s in samples}) == TRAINING_COUNT
        assert {s.attributes.size for s in samples} == {"small", "large"}
        for s in samples:
            assert s.attributes.background in c.backgrounds
            corner = np.asarray(s.image)[0, 0].astype(int)  # plain background: its colour at the corner
            assert np.abs(corner - COLOURS[s.attributes.background]).max() < 8
            text = s.caption(c)
            background = s.attributes.background
            assert text == f"a {s.attributes.size} {{trigger}} {c.class_word} on " \
                           f"{'an' if background[0] in 'aeiou' else 'a'} {background} background"


def test_prompts() -> None:
    c, attrs = CONCEPTS[0], Attributes("small", "green")
    assert caption(c, attrs) == "a small {trigger} star on a green background"
    assert instance_prompt(c, attrs) == "a small {ember} on a green background"
    assert class_prompt(c, attrs) == "a small star on a green background"
    with pytest.raises(ValueError, match="size"):
        Attributes("huge", "green")


def test_random_concepts_are_outside_the_benchmark() -> None:
    rng = np.random.default_rng(0)
    taken = {c.identity for c in CONCEPTS}
    drawn = [random_concept(rng) for _ in range(200)]
    assert not taken & {c.identity for c in drawn}
    assert len({c.identity for c in drawn}) > 190


def test_bad_identity_is_refused() -> None:
    with pytest.raises(ValueError, match="shape the toy base knows"):
        ToyConcept("x", "dog", ("red", "blue"), "dots", "black", "white")
    with pytest.raises(ValueError, match="four different colours"):
        ToyConcept("x", "star", ("red", "red"), "dots", "black", "white")


def test_folder_round_trips_through_the_trainer_loader(tmp_path) -> None:
    c = CONCEPTS[3]
    folder = write_concept_folder(c, tmp_path / c.name)
    images, captions = load_concept_images(folder, 64)
    assert images.shape == (TRAINING_COUNT, 3, 64, 64)
    assert captions == [s.caption(c) for s in training_samples(c)]
    assert concept_from_json(folder / "concept.json") == c
