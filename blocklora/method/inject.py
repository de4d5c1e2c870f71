"""Find a pipeline's target linears by name and wrap them in BlockLoRA layers (and back).

Module keys are component-qualified ("unet.down_blocks.0...attn1.to_q", "text_encoder.text_model
...q_proj") so artifacts, merges and diffusers' LoRA format all speak the same names.
"""

from __future__ import annotations

import torch
from torch import nn

from blocklora.config import TEXT_ENCODERS, AdapterConfig
from blocklora.method.layer import BlockLoRALinear

COMPONENTS = ("unet", *TEXT_ENCODERS)


def _matches(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def find_targets(pipe, cfg: AdapterConfig) -> dict[str, nn.Linear]:
    """Component-qualified name -> the nn.Linear (unwrapped) for every targeted projection."""
    found: dict[str, nn.Linear] = {}
    for comp in COMPONENTS:
        model = getattr(pipe, comp, None)
        suffixes = cfg.unet_targets if comp == "unet" else cfg.text_targets
        if model is None or not suffixes:
            continue
        for name, mod in model.named_modules():
            if isinstance(mod, BlockLoRALinear):
                found[f"{comp}.{name}"] = mod.base
            elif isinstance(mod, nn.Linear) and _matches(name, suffixes):
                found[f"{comp}.{name}"] = mod
    if not found:
        raise ValueError(
            f"no nn.Linear in the pipeline matches the targets {cfg.unet_targets} (unet) / "
            f"{cfg.text_targets} (text encoders); name suffixes such as 'to_q' or 'attn2.to_k' are expected"
        )
    return found


def layout(pipe, cfg: AdapterConfig) -> dict[str, tuple[int, int]]:
    """(m, n) of every target: what an artifact must agree with to be applied to this pipeline."""
    return {k: (lin.out_features, lin.in_features) for k, lin in find_targets(pipe, cfg).items()}


def set_module(pipe, key: str, new: nn.Module) -> None:
    """Put `new` where the component-qualified `key` points (e.g. a wrapper around that linear)."""
    comp, _, path = key.partition(".")
    parent_name, _, child = path.rpartition(".")
    parent = getattr(pipe, comp).get_submodule(parent_name) if parent_name else getattr(pipe, comp)
    setattr(parent, child, new)


def orthogonal_a(key: str, n: int, rank: int, slot: int, num_slots: int, seed: int = 0) -> torch.Tensor:
    """Orthogonal Adaptation's frozen A: rows slot*r..(slot+1)*r of one random orthogonal basis
    per layer (seeded by the layer name), so different slots' A are exactly orthogonal."""
    if num_slots * rank > n:
        raise ValueError(f"{key}: {num_slots} slots x rank {rank} exceed the input size {n}; "
                         "orthogonal A needs num_slots * rank <= n")
    g = torch.Generator().manual_seed(seed + sum(key.encode()))
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return q.T[slot * rank:(slot + 1) * rank].contiguous()  # (r, n)


def inject(pipe, cfg: AdapterConfig, slot: int, dtype: torch.dtype | None = None) -> dict[str, BlockLoRALinear]:
    """Wrap every target of `pipe` for `slot` (adapters in `dtype`, None: each base weight's);
    refuses a pipeline that is already wrapped."""
    targets = find_targets(pipe, cfg)
    layers: dict[str, BlockLoRALinear] = {}
    for key in targets:
        if isinstance(_get(pipe, key), BlockLoRALinear):
            raise RuntimeError(f"{key} is already a BlockLoRALinear; eject() before injecting again")
    for key, lin in targets.items():
        frozen = (orthogonal_a(key, lin.in_features, cfg.rank, slot, cfg.num_slots)
                  if cfg.freeze_a == "orthogonal" else None)
        layer = BlockLoRALinear(lin, cfg.rank, cfg.num_slots, slot, cfg.erasure, cfg.blockwise, frozen, dtype,
                                cfg.row_layout)
        set_module(pipe, key, layer)
        layers[key] = layer
    return layers


def eject(pipe) -> dict[str, BlockLoRALinear]:
    """Put every wrapped base linear back; returns the layers that were removed."""
    removed: dict[str, BlockLoRALinear] = {}
    for comp in COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for name, mod in list(model.named_modules()):
            if isinstance(mod, BlockLoRALinear):
                set_module(pipe, f"{comp}.{name}", mod.base)
                removed[f"{comp}.{name}"] = mod
    return removed


def _get(pipe, key: str) -> nn.Module:
    comp, _, path = key.partition(".")
    return getattr(pipe, comp).get_submodule(path)
