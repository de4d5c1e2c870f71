"""The base's own pictures of a class prompt, drawn once per node and kept on its disk.

Prior preservation and the quiet penalty train against what the base draws for
`class_picture_prompt(word)`. Those pictures depend on the base, the prompt, how many, the seed and
the sampler, not on the concept, so the clients on one node with the same recipe need the very same
ones: in the main job several clients drew the same pictures at the same moment, a large share of
each client's time (docs/results/client-job.md). Here a set is drawn by one job and written (safetensors,
atomically) under a lock file of its own; a job that finds a set locked draws the sets nobody is
drawing first and then waits for it, so jobs that start together share the drawing. A set that does
not read back whole is drawn again and replaced.

The folder is `$BLOCKLORA_CACHE/class-pictures` (default `~/.cache/blocklora`); when its sets pass
`$BLOCKLORA_CACHE_MAX_MB` (default 2048), the least recently used ones are removed, never one that a
job is drawing or has just written. The pictures are the base's, not a client's: nothing here is a
training picture, and nothing leaves the node.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from blocklora.config import TrainConfig, cache_max_bytes, cache_root
from blocklora.files.atomic import atomic_write
from blocklora.files.safefile import InvalidFile, read_safetensors, write_safetensors
from blocklora.pipeline.base import Base
from blocklora.pipeline.prompts import class_picture_prompt

# Bump when how the pictures are drawn changes (sampler, prompt wording): earlier sets are then never read.
FORMAT = 1
Say = Callable[[str], None]  # hears a line about what the run is doing, for the person watching


@torch.no_grad()
def draw_class_images(base: Base, class_word: str, count: int, seed: int, steps: int = 20) -> torch.Tensor:
    """What the base draws for `class_picture_prompt(class_word)`: (count, 3, H, W) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    out = base.pipe([class_picture_prompt(class_word)] * count, num_inference_steps=steps, generator=g,
                    output_type="pt", height=base.resolution, width=base.resolution).images
    return out * 2 - 1


def set_key(base: Base, class_word: str, count: int, seed: int, steps: int) -> str:
    """Everything that decides a set's pixels, hashed: the base's weights, the prompt, the sampler's
    settings, and where and in what precision it ran (a GPU draws other last bits than a CPU)."""
    unet = base.pipe.unet
    fields = {"format": FORMAT, "base": base.fingerprint, "prompt": class_picture_prompt(class_word), "count": count,
              "seed": seed, "steps": steps, "resolution": base.resolution, "device": unet.device.type,
              "dtype": str(unet.dtype), "torch": torch.__version__}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def class_image_sets(base: Base, words: Sequence[str], count: int, seed: int, steps: int = 20,
                     say: Say | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """({word: its set}, how many sets this job drew): `draw_class_images` for each word, read from this
    node's cache where a set is there. A set that another job is drawing is left for last, so that jobs
    starting together share the drawing instead of waiting in turn. `say` hears each set drawn here
    and each wait; reads are silent."""
    say = say or (lambda line: None)
    folder, cap = cache_root() / "class-pictures", cache_max_bytes()  # a bad setting is refused before any work
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot keep class pictures in {folder} ({err.strerror}); "
                      f"point BLOCKLORA_CACHE at a folder this user can write") from err
    sets: dict[str, torch.Tensor] = {}
    drawn, busy = 0, []
    for word in dict.fromkeys(words):  # first what nobody else is drawing
        got = _fetch(base, word, count, seed, steps, say, cap, wait=False)
        if got is None:
            busy.append(word)
        else:
            sets[word], was_drawn = got
            drawn += was_drawn
    for word in busy:  # then the sets other jobs were drawing (drawn here if such a job died)
        sets[word], was_drawn = _fetch(base, word, count, seed, steps, say, cap, wait=True)
        drawn += was_drawn
    return {word: sets[word] for word in dict.fromkeys(words)}, drawn


def _fetch(base: Base, word: str, count: int, seed: int, steps: int, say: Say, cap: int,
           wait: bool) -> tuple[torch.Tensor, bool] | None:
    """(the set, whether it was drawn here); None when another job holds its lock and `wait` is off.
    A set read or written is marked used (its mtime); after writing one, older sets go while the folder is
    over `cap`."""
    prompt, folder = class_picture_prompt(word), cache_root() / "class-pictures"
    key = set_key(base, word, count, seed, steps)
    path, shape = folder / f"{key}.safetensors", (count, 3, base.resolution, base.resolution)
    pictures = _read(path, shape, key)
    if pictures is not None:
        _mark_used(path)
        return pictures.to(base.pipe.unet.device), False
    with open(folder / f"{key}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                return None
            say(f"waiting for another job on this node that is drawing '{prompt}'")
            fcntl.flock(lock, fcntl.LOCK_EX)  # released by close, also when that job dies
        pictures = _read(path, shape, key)  # drawn while this job waited
        if pictures is not None:
            _mark_used(path)
            return pictures.to(base.pipe.unet.device), False
        say(f"drawing {plural(count, 'base picture')} of '{prompt}'")
        pictures = draw_class_images(base, word, count, seed, steps)
        atomic_write(path, write_safetensors({"pictures": pictures}, {"key": key}))
        _mark_used(path)
        _evict(folder, cap, path, say)
        return pictures, True


def _mark_used(path: Path) -> None:
    """A set read or written is the newest in use: eviction goes by modification time, least recent
    first. Stamped from the process clock to the nanosecond, not left to the file system, whose clock
    ticks every few milliseconds: a set written and another read within one tick would tie."""
    now = time.time_ns()
    with contextlib.suppress(OSError):  # another user's file, or just evicted: order only
        os.utime(path, ns=(now, now))


def _evict(folder: Path, cap: int, keep: Path, say: Say) -> None:
    """Remove the least recently used sets until those left fit in `cap` bytes; never `keep` (just
    written) and never a set whose lock another job holds (it is drawing it, or about to read it back)."""
    sets = []
    for path in folder.glob("*.safetensors"):
        with contextlib.suppress(FileNotFoundError):
            stat = path.stat()
            sets.append((stat.st_mtime_ns, stat.st_size, path))
    total, removed = sum(size for _, size, _ in sets), 0
    for _, size, path in sorted(sets):
        if total <= cap:
            break
        if path == keep:
            continue
        with open(path.with_suffix(".lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            path.unlink(missing_ok=True)
        total, removed = total - size, removed + 1
    if removed:
        say(f"removed {plural(removed, 'older class-picture set')} to keep this node's class pictures under "
            f"{cap / 2**20:g} MB (BLOCKLORA_CACHE_MAX_MB)")


def class_pool(base: Base, train: TrainConfig, class_word: str,
               say: Say | None = None) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """(the concept's class pictures, the quiet penalty's other classes' pictures by class word) that
    training needs, before the trainer touches the base: (None, {}) when neither prior preservation nor
    the quiet penalty is on. Both come from the node's cache, so the jobs of one node share their drawing;
    the trainer takes the others from here (`ConceptTrainer.prepare`) rather than reading them again.
    `say` hears what is needed, drawn and waited for."""
    if not train.uses_class_images:
        return None, {}
    uses = " and ".join(use for use, on in (("prior preservation", train.prior_preservation),
                                             ("the quiet penalty", train.quiet_weight > 0)) if on)
    words = [class_word, *train.quiet_others(class_word)]
    say = say or (lambda line: None)
    say(f"class pictures for {uses}: {plural(train.num_class_images, 'base picture')} "
        + (f"each of {plural(len(words), 'class')} ({', '.join(words)})" if len(words) > 1 else f"of '{class_word}'"))
    started = time.monotonic()
    sets, drawn = class_image_sets(base, words, train.num_class_images, train.seed, say=say)
    say(f"class pictures ready in {time.monotonic() - started:.1f} s: {drawn} drawn here, "
        f"{len(words) - drawn} read from this node's cache")
    return sets[class_word], {word: sets[word] for word in words[1:]}


def plural(count: int, noun: str) -> str:
    """'1 base picture', '8 base pictures', '2 more classes': the lines a person reads."""
    return f"{count} {noun}" + ("" if count == 1 else "es" if noun.endswith("s") else "s")


def _read(path: Path, shape: tuple[int, ...], key: str) -> torch.Tensor | None:
    """The set at `path` if it is there and whole (the right key, shape, dtype, values), else None."""
    try:
        tensors, meta = read_safetensors(path.read_bytes(), max_bytes=4 * torch.Size(shape).numel() + 4096)
    except (FileNotFoundError, InvalidFile):
        return None
    pictures = tensors.get("pictures")
    if (meta.get("key") != key or pictures is None or set(tensors) != {"pictures"} or pictures.shape != shape
            or pictures.dtype != torch.float32 or not bool(pictures.isfinite().all())
            or bool(pictures.abs().max() > 1)):
        return None
    return pictures
