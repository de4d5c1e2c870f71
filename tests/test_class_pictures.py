"""The node's cache of the base's class pictures (blocklora/training/class_pictures.py), on the tiny base's real
pipeline: a set is drawn once and read back bit for bit; a set another job is drawing is left for last
and then waited for; what is on disk and not a whole set is drawn again."""

from __future__ import annotations

import fcntl
import shutil
import threading

import pytest
import torch

from blocklora.files.atomic import atomic_write
from blocklora.files.safefile import write_safetensors
from blocklora.pipeline.base import load_base
from blocklora.training.class_pictures import class_image_sets, class_pool, draw_class_images, set_key


@pytest.fixture
def node(tmp_path, monkeypatch):
    """(a tiny base whose UNet calls are counted, this node's empty class-picture folder)."""
    monkeypatch.setenv("BLOCKLORA_CACHE", str(tmp_path))
    base = load_base("tiny")
    base.unet_calls = 0

    def count(*_):
        base.unet_calls += 1
    base.pipe.unet.register_forward_hook(count)
    return base, tmp_path / "class-pictures"


def test_a_set_is_drawn_once_and_read_back_bit_for_bit(node):
    base, folder = node
    said = []
    first = class_image_sets(base, ["dog"], 2, seed=3, steps=2, say=said.append)[0]["dog"]
    drawn = base.unet_calls
    again, drawn_here = class_image_sets(base, ["dog"], 2, seed=3, steps=2, say=said.append)
    assert drawn > 0 and base.unet_calls == drawn and drawn_here == 0  # from disk: the UNet never ran
    assert torch.equal(first, again["dog"]) and torch.equal(first, draw_class_images(base, "dog", 2, seed=3, steps=2))
    assert said == ["drawing 2 base pictures of 'a photo of dog'"]  # reading is silent
    assert [p.suffix for p in sorted(folder.iterdir())] == [".lock", ".safetensors"]
    # what decides the pixels decides the set: another seed, count, step count or prompt is drawn anew
    for other in (("dog", 2, 4, 2), ("dog", 1, 3, 2), ("dog", 2, 3, 3), ("cat", 2, 3, 2)):
        assert set_key(base, *other) != set_key(base, "dog", 2, 3, 2)


def test_a_set_another_job_is_drawing_is_left_for_last_then_waited_for_and_read(node):
    """Another job holds the dog set's lock (the same lock file, the same protocol). This job draws the
    cat set first, then says it waits; once the dog set is written and the lock let go, it reads it
    without running the UNet."""
    base, folder = node
    folder.mkdir()
    key = set_key(base, "dog", 2, 0, 2)
    said, got, waiting = [], {}, threading.Event()

    def say(line: str) -> None:
        said.append(line)
        if line.startswith("waiting"):
            waiting.set()
    with open(folder / f"{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        job = threading.Thread(target=lambda: got.update(zip(("sets", "drawn"),
                                                             class_image_sets(base, ["dog", "cat"], 2, 0, 2, say))))
        job.start()
        assert waiting.wait(120), said
        pictures = draw_class_images(base, "dog", 2, 0, 2)  # the other job's drawing
        atomic_write(folder / f"{key}.safetensors", write_safetensors({"pictures": pictures}, {"key": key}))
        calls = base.unet_calls
    job.join(60)
    assert said == ["drawing 2 base pictures of 'a photo of cat'",
                    "waiting for another job on this node that is drawing 'a photo of dog'"]
    assert list(got["sets"]) == ["dog", "cat"] and got["drawn"] == 1
    assert torch.equal(got["sets"]["dog"], pictures) and base.unet_calls == calls


@pytest.mark.parametrize("damage", ["truncated", "other key", "wrong shape", "out of range"])
def test_a_set_that_is_not_whole_is_drawn_again_and_replaced(node, damage):
    base, folder = node
    good = draw_class_images(base, "dog", 2, seed=0, steps=2)
    class_image_sets(base, ["dog"], 2, seed=0, steps=2)
    path = folder / f"{set_key(base, 'dog', 2, 0, 2)}.safetensors"
    data = {"truncated": lambda: path.read_bytes()[:-100],
            "other key": lambda: write_safetensors({"pictures": good}, {"key": "0" * 32}),
            "wrong shape": lambda: write_safetensors({"pictures": good[:1]}, {"key": path.stem}),
            "out of range": lambda: write_safetensors({"pictures": good * 3}, {"key": path.stem})}[damage]()
    path.write_bytes(data)
    said = []
    again, drawn = class_image_sets(base, ["dog"], 2, seed=0, steps=2, say=said.append)
    assert said == ["drawing 2 base pictures of 'a photo of dog'"] and drawn == 1 and torch.equal(again["dog"], good)
    assert class_image_sets(base, ["dog"], 2, seed=0, steps=2)[1] == 0  # and the file on disk is whole again


def test_a_cache_folder_that_cannot_be_made_is_a_clear_error(node, monkeypatch, tmp_path):
    base, _ = node
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("BLOCKLORA_CACHE", str(tmp_path / "a-file"))
    with pytest.raises(OSError, match=r"cannot keep class pictures in .*a-file/class-pictures .*BLOCKLORA_CACHE"):
        class_image_sets(base, ["dog"], 2, seed=0, steps=2)
    assert base.unet_calls == 0


def test_the_trainer_records_its_bank_from_the_sets_class_pool_fetched(node):
    """`class_pool` fetches the concept's class pictures and the quiet penalty's other classes' once; the
    trainer's bank takes them from it: with the node's folder emptied in between, preparing draws nothing
    (the UNet runs once per class picture, to record the bank) and records the bank it would have
    recorded from the cache."""
    from blocklora.config import AdapterConfig, TrainConfig
    from blocklora.training.trainer import ConceptTrainer

    base, folder = node
    train = TrainConfig(steps=1, resolution=32, quiet_weight=1.0, quiet_classes=("cat", "cup"), num_class_images=2)
    prior, others = class_pool(base, train, "dog")
    assert list(others) == ["cat", "cup"] and prior.shape[0] == 2
    assert torch.equal(others["cat"], class_image_sets(base, ["cat"], 2, train.seed)[0]["cat"])
    shutil.rmtree(folder)
    banks = []
    for given in (others, None):  # from class_pool, then as a trainer without them reads the node's cache
        trainer = ConceptTrainer(base, AdapterConfig(rank=2, num_slots=4), train, 1, "pet", "dog")
        before = base.unet_calls
        trainer.prepare(prior, None, given)
        banks.append((trainer.quiet, base.unet_calls - before))
        trainer.close()
    (from_pool, calls), (from_cache, calls_with_drawing) = banks
    assert calls_with_drawing > calls  # without them the trainer had to draw both sets again
    for key in from_pool.inputs:
        assert torch.equal(from_pool.inputs[key], from_cache.inputs[key])
        assert torch.equal(from_pool.reference[key], from_cache.reference[key])


def test_the_folder_stays_under_its_cap_least_recently_used_first(node, monkeypatch):
    """With room for two and a half sets, a third set written removes the least recently used one (a set
    read counts as used), never one whose lock another job holds; a removed set is drawn again, the same
    bit for bit. A cap that is not a positive number is refused before any work."""
    base, folder = node
    said = []

    def fetch(word: str) -> torch.Tensor:
        return class_image_sets(base, [word], 2, seed=3, steps=2, say=said.append)[0][word]

    def kept() -> set[str]:
        return {p.stem for p in folder.glob("*.safetensors")}

    def key(word: str) -> str:
        return set_key(base, word, 2, 3, 2)

    cat = fetch("cat")
    size = (folder / f"{key('cat')}.safetensors").stat().st_size
    monkeypatch.setenv("BLOCKLORA_CACHE_MAX_MB", str(2.5 * size / 2**20))
    fetch("dog")
    fetch("cat")  # read: now the dog set is the least recently used
    fetch("cup")
    assert kept() == {key("cat"), key("cup")}
    assert said[-1].startswith("removed 1 older class-picture set to keep this node's class pictures under 0.")
    with open(folder / f"{key('cat')}.lock", "a") as lock:  # another job holds the cat set (oldest now)
        fcntl.flock(lock, fcntl.LOCK_EX)
        fetch("cow")
    assert kept() == {key("cat"), key("cow")}
    calls = base.unet_calls
    dog = fetch("dog")  # removed above: drawn again (and the cat set, least recently used, goes)
    assert base.unet_calls > calls and kept() == {key("cow"), key("dog")}
    assert torch.equal(dog, draw_class_images(base, "dog", 2, seed=3, steps=2))
    assert torch.equal(fetch("cat"), cat)

    for bad in ("abc", "0", "-5", "nan", "inf"):
        monkeypatch.setenv("BLOCKLORA_CACHE_MAX_MB", bad)
        before = sorted(folder.iterdir())
        with pytest.raises(ValueError, match="BLOCKLORA_CACHE_MAX_MB must be a positive number"):
            fetch("bird")
        assert sorted(folder.iterdir()) == before
