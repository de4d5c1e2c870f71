"""A concept as one safetensors file: owned B rows, A, trigger embeddings and validated metadata.

This is the only thing that leaves a client. Loading checks everything the file claims against
itself (shapes vs. its own slot and layout, finiteness) and, with `blocklora.method.slots.SlotSpace.check`,
against the federation or pipeline it is meant for; any failure raises `InvalidArtifact` and returns nothing.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blocklora.config import AdapterConfig
from blocklora.files.atomic import atomic_write
from blocklora.files.safefile import InvalidFile, read_safetensors, write_safetensors
from blocklora.files.schema import SchemaError, check_text, parse
from blocklora.method.partition import block_delta, owned_rows, row_count
from blocklora.method.tokens import trigger_names

FORMAT = "blocklora-concept"
FORMAT_VERSION = 1
MAX_ARTIFACT_BYTES = 512 * 1024 * 1024
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # always used with fullmatch: `$` would accept "pet\n"
MAX_CLASS_WORD = 64
# |value| of any factor or embedding entry. Trained ones stay within a few units; 1e3 keeps every
# product a replica forms (x A^T, then B) finite in float32 even when α = 0 multiplies it for the
# other samples of a batch: a finite but huge factor (3e38) would make those samples NaN.
MAX_ABS_VALUE = 1e3


class InvalidArtifact(ValueError):
    """The artifact is malformed or does not belong here; the message names the problem."""


def check_name(name: str) -> str:
    """A concept name: the same rule at reservation, at upload and on load of the state."""
    if type(name) is not str or not NAME_RE.fullmatch(name):
        shown = ascii(name)[:80] if isinstance(name, str) else type(name).__name__
        raise InvalidArtifact(
            f"concept name {shown} is not allowed: use 1-64 ASCII letters, digits, '-', '_' or '.', "
            "starting with a letter or digit"
        )
    return name


def check_class_word(word: str) -> str:
    """A class word ("dog"): 1-64 printable characters once stripped; returns it stripped. The same
    rule at reservation and in an uploaded artifact's metadata."""
    try:
        return check_text(word.strip() if type(word) is str else word, "class word", MAX_CLASS_WORD)
    except SchemaError as err:
        raise InvalidArtifact(str(err)) from None


@dataclass(frozen=True)
class ConceptMeta:
    """What a concept claims about itself; stored as JSON in the safetensors header."""

    name: str
    class_word: str
    slot: int
    adapter: AdapterConfig
    base_fingerprint: str
    layout: dict[str, tuple[int, int]]  # target key -> (m, n) of the base weight
    triggers: tuple[str, ...]
    train_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["format"] = FORMAT
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ConceptMeta":
        """Exact types for every field (blocklora.files.schema), then the rules between fields."""
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as err:  # 5000-digit integers, deep nesting, bad JSON
            raise InvalidArtifact(f"metadata is not valid JSON: {str(err)[:200]}") from None
        if type(d) is not dict or d.pop("format", None) != FORMAT:
            raise InvalidArtifact(f"not a blocklora concept (format is not {FORMAT!r})")
        if d.get("format_version") != FORMAT_VERSION or type(d.get("format_version")) is not int:
            raise InvalidArtifact(f"format version {ascii(d.get('format_version'))[:40]} is not supported "
                                  f"(expected {FORMAT_VERSION})")
        try:
            meta = parse(cls, d, "metadata")
        except SchemaError as err:
            raise InvalidArtifact(f"metadata is malformed: {err}") from None
        if not 0 <= meta.slot < meta.adapter.num_slots:
            raise InvalidArtifact(f"slot {meta.slot} is outside 0..{meta.adapter.num_slots - 1}")
        check_name(meta.name)
        if check_class_word(meta.class_word) != meta.class_word:
            raise InvalidArtifact(f"class word {meta.class_word!a} has surrounding whitespace")
        if not re.fullmatch(r"[0-9a-f]{64}", meta.base_fingerprint):
            raise InvalidArtifact(f"base fingerprint {meta.base_fingerprint[:80]!a} is not a sha256 hex digest")
        if meta.triggers != tuple(trigger_names(meta.slot, meta.adapter.tokens_per_concept)):
            raise InvalidArtifact(f"trigger tokens {ascii(meta.triggers)[:80]} do not belong to slot {meta.slot}")
        return meta


def _a_key(key: str) -> str:
    return f"{key}.lora_A"


def _b_key(key: str) -> str:
    return f"{key}.lora_B"


def _token_key(comp: str) -> str:
    return f"{comp}.token_embeds"


@dataclass
class ConceptArtifact:
    meta: ConceptMeta
    # "{key}.lora_A" (r, n), "{key}.lora_B" (|R|, r), "{component}.token_embeds" (t, d)
    tensors: dict[str, torch.Tensor]

    @classmethod
    def from_parts(cls, meta: ConceptMeta, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   token_embeds: dict[str, torch.Tensor]) -> "ConceptArtifact":
        """An artifact from target key -> (A (r, n), owned rows of B (|R|, r)) and text-encoder
        component -> trigger vectors (t, d); the tensor naming stays this module's business."""
        tensors = {}
        for key, (a, b_rows) in factors.items():
            tensors[_a_key(key)], tensors[_b_key(key)] = a, b_rows
        tensors.update({_token_key(comp): v for comp, v in token_embeds.items()})
        return cls(meta, tensors)

    @property
    def name(self) -> str:
        return self.meta.name

    def rows(self, key: str) -> slice:
        m = self.meta.layout[key][0]
        a = self.meta.adapter
        return owned_rows(m, a.num_slots, self.meta.slot, a.blockwise, a.row_layout)

    def factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, n), B_R (|R|, r)): dW = (M ⊙ B) A is zero outside `rows(key)` and B_R A inside."""
        return self.tensors[_a_key(key)], self.tensors[_b_key(key)]

    def delta_rows(self, key: str) -> torch.Tensor:
        """The non-zero rows of dW for `key`: B_R A, shape (|R|, n)."""
        a, b_rows = self.factors(key)
        return block_delta(b_rows, a)

    def delta(self, key: str) -> torch.Tensor:
        """The exact dense dW = (M ⊙ B) A for `key`, shape (m, n)."""
        m, n = self.meta.layout[key]
        a, _ = self.factors(key)
        dw = torch.zeros(m, n, dtype=a.dtype, device=a.device)
        dw[self.rows(key)] = self.delta_rows(key)
        return dw

    def token_embeds(self) -> dict[str, torch.Tensor]:
        """Text-encoder component name -> this concept's trigger vectors (t, d)."""
        suffix = _token_key("")
        return {k[: -len(suffix)]: v for k, v in self.tensors.items() if k.endswith(suffix)}

    def to_bytes(self) -> bytes:
        return write_safetensors(self.tensors, {"blocklora": self.meta.to_json()})

    def save(self, path: str | Path) -> Path:
        """Write atomically: a reader never sees half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, max_bytes: int = MAX_ARTIFACT_BYTES) -> "ConceptArtifact":
        try:
            tensors, header = read_safetensors(data, max_bytes)
        except InvalidFile as err:
            raise InvalidArtifact(str(err)) from None
        if "blocklora" not in header:
            raise InvalidArtifact("no blocklora metadata in the safetensors header: not a concept artifact")
        art = cls(ConceptMeta.from_json(header["blocklora"]), tensors)
        art._check_tensors()
        return art

    @classmethod
    def load(cls, path: str | Path, max_bytes: int = MAX_ARTIFACT_BYTES) -> "ConceptArtifact":
        path = Path(path)
        size = path.stat().st_size
        if size > max_bytes:
            raise InvalidArtifact(f"{path} is {size:,} bytes; the limit is {max_bytes:,}")
        return cls.from_bytes(path.read_bytes(), max_bytes)

    def _check_tensors(self) -> None:
        """Every tensor the layout implies, with the right shape, one dtype, finite and within
        ±MAX_ABS_VALUE; nothing else."""
        r, t = self.meta.adapter.rank, self.meta.adapter.tokens_per_concept
        expected: dict[str, tuple[int, ...] | None] = {}
        for key, (m, n) in self.meta.layout.items():
            try:
                rows = self.rows(key)
            except ValueError as err:
                raise InvalidArtifact(f"{key}: {err}") from None
            expected[_a_key(key)] = (r, n)
            expected[_b_key(key)] = (row_count(rows, m), r)
        embeds = [k for k in self.tensors if k.endswith(_token_key(""))]
        if not embeds:
            raise InvalidArtifact("the artifact carries no token embeddings for its trigger")
        for k in embeds:
            expected[k] = None  # (t, d); d is checked against the text encoder in SlotSpace.check
        missing = sorted(set(expected) - set(self.tensors))
        extra = sorted(set(self.tensors) - set(expected))
        if missing or extra:
            raise InvalidArtifact(f"tensor set does not match the layout: missing {missing[:5]}, "
                                  f"unexpected {extra[:5]}")
        dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in self.tensors.values()})
        if len(dtypes) > 1:
            raise InvalidArtifact(f"tensors mix dtypes {dtypes}; save every tensor in one dtype")
        for k, shape in expected.items():
            v = self.tensors[k]
            got = tuple(v.shape)
            if shape is not None and got != shape:
                raise InvalidArtifact(f"{k} has shape {got}; slot {self.meta.slot} of this layout needs {shape}")
            if shape is None and (v.dim() != 2 or got[0] != t):
                raise InvalidArtifact(f"{k} has shape {got}; expected ({t}, hidden) for {t} trigger token(s)")
            if not torch.isfinite(v).all():
                raise InvalidArtifact(f"{k} contains NaN or Inf values")
            peak = v.abs().max().item() if v.numel() else 0.0
            if peak > MAX_ABS_VALUE:
                raise InvalidArtifact(f"{k} holds a value of magnitude {peak:.3g}; the bound is {MAX_ABS_VALUE:g} "
                                      "(trained factors and embeddings stay within a few units)")
