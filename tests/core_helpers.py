"""Small builders shared by the core tests (importable, unlike conftest fixtures)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.synthetic import random_artifact
from blocklora.config import AdapterConfig
from blocklora.method.slots import SlotSpace
from blocklora.pipeline.base import Base
from prerun import Runner, run_now


def make_artifact(base: Base, cfg: AdapterConfig, name: str, slot: int, seed: int = 0, **kw):
    space = SlotSpace.of(base, cfg)
    return random_artifact(name, slot, cfg, base.fingerprint, space.layout, space.hidden, seed, **kw)


def fused_weight(pipe, key: str) -> torch.Tensor:
    """The weight diffusers computes for target `key` after `load_lora_weights` + `fuse_lora`."""
    comp, _, path = key.partition(".")
    mod = getattr(pipe, comp).get_submodule(path)
    return (mod.base_layer if hasattr(mod, "base_layer") else mod).weight


def write_images(folder: Path, n: int = 4, size: int = 32, seed: int = 0) -> Path:
    """A few distinct, deterministic pictures: coloured squares on noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = (rng.random((size, size, 3)) * 80).astype(np.uint8)
        lo, hi = size // 4, 3 * size // 4
        arr[lo:hi, lo:hi] = rng.integers(100, 255, 3)
        Image.fromarray(arr).save(folder / f"{i}.png")
    return folder


def model_code_imported(code: str, *args: str, run: Runner = run_now) -> tuple[list[str], str]:
    """Run `code` in a fresh interpreter (the repo as cwd); which of diffusers and transformers it
    imported (those are the seconds a light process must not pay), and what it printed."""
    probe = code + ("; import json as _j, sys as _s; print(); "
                    "print(_j.dumps(sorted(m for m in ('diffusers', 'transformers') if m in _s.modules)))")
    done = run([sys.executable, "-c", probe, *args], cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    *printed, last = done.stdout.strip().splitlines()
    return json.loads(last), "\n".join(printed).strip()
