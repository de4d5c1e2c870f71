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


def make_artifact(base: Base, cfg: AdapterConfig, name: str, slot: int, seed: int = 0, class_word: str = "dog", **kw):
    """A random concept as training would ship it; "dog", the class word the federation tests reserve."""
    space = SlotSpace.of(base, cfg)
    return random_artifact(name, slot, cfg, base.fingerprint, space.layout, space.hidden, seed,
                           class_word=class_word, **kw)


def enrol(federation, admin: str, name: str, quota: int | None = None, remote: bool = False) -> str:
    """The admin invites `name`, who registers one client: its token. `federation` is a Registry,
    or (remote) a coordinator actor handle (federation.coordinator.enrol)."""
    from federation.auth import new_client_token, new_invitation_code

    if remote:
        from federation.coordinator import enrol as enrol_remote
        return enrol_remote(federation, admin, name, quota)
    code, token = new_invitation_code(), new_client_token()
    federation.invite(admin, name, code, quota)
    federation.register(code, token)
    return token


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


def open_registry(base: Base, folder: Path, adapter: AdapterConfig, admin: str, **cfg):
    """A Registry on `folder` (its store locked until `close`), with FederationConfig(**cfg)."""
    from blocklora.config import FederationConfig
    from federation.auth import token_hash
    from federation.registry import Registry
    from federation.store import StateStore

    return Registry(SlotSpace.of(base, adapter), FederationConfig(**cfg), StateStore(folder), token_hash(admin))


def add_concept(reg, base: Base, token: str, name: str, seed: int = 0, with_: tuple[str, ...] = ()):
    """Reserve `name` (class word "dog") and submit a random artifact for the slot granted: the artifact."""
    art = make_artifact(base, reg.adapter, name, reg.reserve(token, name, "dog", with_).slot, seed=seed)
    reg.submit(token, art.to_bytes())
    return art
