"""Precision names -> torch dtypes, and the autocast of mixed-precision training.

Two knobs, named as diffusers users know them: `--dtype` (float32 / float16 / bfloat16) is the
dtype a frozen base is loaded in for generation and serving; `--mixed-precision` (no / fp16 /
bf16, accelerate's names) trains on a base held in that half dtype while the adapter, the trigger
embeddings and the optimizer state stay float32 and the forward runs under `torch.autocast`.
Artifacts are float32 whatever either knob says. config.py holds the names (it imports no torch);
this module turns them into dtypes and refuses a combination the device cannot run.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from blocklora.config import DTYPE_NAMES, MIXED_PRECISION

DTYPES: dict[str, torch.dtype] = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16)))
MIXED: dict[str, torch.dtype | None] = dict(zip(MIXED_PRECISION, (None, torch.float16, torch.bfloat16)))


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a --dtype name."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def base_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype the frozen base is loaded in for training under `mixed_precision` ('no': float32)."""
    if mixed_precision not in MIXED:
        raise ValueError(f"mixed_precision must be one of {list(MIXED)}, got {mixed_precision!r}")
    return MIXED[mixed_precision] or torch.float32


def check_mixed(mixed_precision: str, device: torch.device | str) -> None:
    """Refuse fp16 mixed precision off CUDA: it needs a GradScaler (fp16 gradients underflow without
    one) and fp16 kernels, and CPU autocast runs fp16 matmuls slower than fp32. bf16 runs anywhere."""
    kind = torch.device(device).type
    if base_dtype(mixed_precision) == torch.float16 and kind != "cuda":
        raise ValueError(f"mixed_precision='fp16' needs a CUDA device (GradScaler, fp16 kernels); this base is on "
                         f"{kind}: use --mixed-precision bf16 there, or 'no' for float32")


def autocast(mixed_precision: str, device: torch.device | str) -> ContextManager:
    """The forward's context: autocast to the half dtype, or nothing at all for 'no'."""
    half = MIXED[mixed_precision]
    if half is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=half)
