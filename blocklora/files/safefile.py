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
from safetensors.torch import load as st_load, save as st_save

ALLOWED_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}
MAX_HEADER = 4 * 1024 * 1024  # 4 MiB of JSON is far beyond any real concept header
MAX_DIMS = 8  # a concept holds matrices; a few more dimensions cost nothing to allow


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
    except (ValueError, RecursionError) as err:  # bad UTF-8/JSON, 5000-digit integers, deep nesting
        raise InvalidFile(f"header is not valid JSON ({str(err)[:200]}); the file is corrupted or not "
                          "safetensors") from None
    if not isinstance(header, dict):
        raise InvalidFile("header is not a JSON object")
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InvalidFile("__metadata__ must map strings to strings")
    payload = len(data) - 8 - n
    spans = []
    for name, info in header.items():
        name = ascii(name)[:80]  # for messages: any text, bounded, and encodable wherever it goes
        if type(info) is not dict or set(info) != {"dtype", "shape", "data_offsets"}:
            raise InvalidFile(f"tensor {name}: malformed entry")
        if type(info["dtype"]) is not str or info["dtype"] not in ALLOWED_DTYPES:
            shown = ascii(info["dtype"]).strip("'")[:20]
            raise InvalidFile(f"tensor {name} has dtype {shown}; allowed: {sorted(ALLOWED_DTYPES)}")
        shape, offsets = info["shape"], info["data_offsets"]
        if type(shape) is not list or len(shape) > MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape):
            raise InvalidFile(f"tensor {name} has an invalid shape {ascii(shape)[:80]}")
        if type(offsets) is not list or len(offsets) != 2 or not all(type(o) is int for o in offsets) \
                or not 0 <= offsets[0] <= offsets[1] <= payload:
            raise InvalidFile(f"tensor {name} offsets {ascii(offsets)[:80]} fall outside the {payload:,}-byte "
                              "payload (truncated?)")
        a, b = offsets
        if b - a != math.prod(shape) * ALLOWED_DTYPES[info["dtype"]]:
            raise InvalidFile(f"tensor {name}: {b - a} bytes do not hold shape {shape} of {info['dtype']}")
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
