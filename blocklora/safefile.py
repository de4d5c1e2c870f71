"""Reading safetensors that crossed a boundary: every size is checked before anything is allocated.

A safetensors file is 8 bytes of header length, a JSON header, then raw tensor bytes. We parse the
header ourselves, bound it, check every dtype, shape and offset against the payload, and only then
let `safetensors` materialise tensors. Nothing here can unpickle.
"""

from __future__ import annotations

import json
import math
import struct

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

ALLOWED_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}
MAX_HEADER = 4 * 1024 * 1024  # 4 MiB of JSON is far beyond any real concept header


class InvalidFile(ValueError):
    """The bytes are not an acceptable safetensors payload; the message says why."""


def read_safetensors(data: bytes, max_bytes: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validate and load (tensors, metadata) from untrusted bytes."""
    if len(data) > max_bytes:
        raise InvalidFile(f"file is {len(data):,} bytes; the limit is {max_bytes:,}")
    if len(data) < 8:
        raise InvalidFile(f"file is {len(data)} bytes: too short to be safetensors (truncated?)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER:
        raise InvalidFile(f"declared header of {n:,} bytes exceeds the {MAX_HEADER:,}-byte limit")
    if 8 + n > len(data):
        raise InvalidFile(f"declared header of {n:,} bytes runs past the end of a {len(data):,}-byte file (truncated?)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidFile(f"header is not valid JSON ({err}); the file is corrupted or not safetensors") from None
    if not isinstance(header, dict):
        raise InvalidFile("header is not a JSON object")
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InvalidFile("__metadata__ must map strings to strings")
    payload = len(data) - 8 - n
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise InvalidFile(f"tensor {name!r}: malformed entry")
        if info["dtype"] not in ALLOWED_DTYPES:
            raise InvalidFile(f"tensor {name!r} has dtype {info['dtype']}; allowed: {sorted(ALLOWED_DTYPES)}")
        shape, (a, b) = info["shape"], info["data_offsets"]
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InvalidFile(f"tensor {name!r} has an invalid shape {shape}")
        if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b <= payload):
            raise InvalidFile(f"tensor {name!r} offsets {a}..{b} fall outside the {payload:,}-byte payload (truncated?)")
        if b - a != math.prod(shape) * ALLOWED_DTYPES[info["dtype"]]:
            raise InvalidFile(f"tensor {name!r}: {b - a} bytes do not hold shape {shape} of {info['dtype']}")
        spans.append((a, b))
    spans.sort()
    end = 0
    for a, b in spans:
        if a != end:
            raise InvalidFile("tensor byte ranges overlap or leave gaps; the file is corrupted or forged")
        end = b
    if end != payload:
        raise InvalidFile(f"{payload - end} trailing bytes after the last tensor; the file is corrupted")
    try:
        tensors = st_load(data)
    except Exception as err:  # safetensors raises its own error types
        raise InvalidFile(f"safetensors refused the file: {err}") from None
    return tensors, meta


def write_safetensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    return st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=meta)
