"""The peers, behind the same interface: plain LoRA (averaged or summed), Orthogonal Adaptation,
TIES merging, and BlockLoRA's own ablations. Each is an adapter shape for training plus a merge
rule that turns a set of artifacts into one residual per target layer."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from blocklora.artifact import ConceptArtifact
from blocklora.base import Base
from blocklora.config import AdapterConfig
from blocklora.inject import find_targets
from blocklora.tokens import add_slot_tokens, token_ids


@dataclass(frozen=True)
class Method:
    """How concepts are trained (adapter overrides) and how a set of them is merged."""

    name: str
    adapter: dict  # overrides applied to the federation's AdapterConfig
    merge: str  # "sum" (α = 1), "mean" (α = 1/N) or "ties"

    def adapter_config(self, base_cfg: AdapterConfig) -> AdapterConfig:
        return dataclasses.replace(base_cfg, **self.adapter)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("blocklora", {}, "sum"),
    Method("blocklora-no-erasure", {"erasure": 0.0}, "sum"),
    Method("blocklora-no-blocks", {"blockwise": False}, "sum"),
    Method("lora-mean", {"blockwise": False, "erasure": 0.0}, "mean"),
    Method("lora-sum", {"blockwise": False, "erasure": 0.0}, "sum"),
    Method("orthogonal", {"blockwise": False, "erasure": 0.0, "freeze_a": "orthogonal"}, "sum"),
    Method("ties", {"blockwise": False, "erasure": 0.0}, "ties"),
]}


def ties(deltas: list[torch.Tensor], density: float = 0.2, lam: float = 1.0) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim each update to its top-`density` magnitudes, elect
    a sign per entry by total mass, average only the entries that agree with it."""
    stacked = torch.stack([d.float() for d in deltas])  # (N, m, n)
    flat = stacked.reshape(len(deltas), -1)
    k = max(1, int(density * flat.shape[1]))
    thresh = flat.abs().kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values
    trimmed = torch.where(flat.abs() >= thresh, flat, torch.zeros_like(flat))
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    return (lam * merged).reshape(stacked.shape[1:])


def merge_deltas(arts: list[ConceptArtifact], rule: str, scales: list[float] | None = None) -> dict[str, torch.Tensor]:
    """One dense residual per target key for the set `arts` under `rule`."""
    if not arts:
        return {}
    if rule == "ties":
        return {k: ties([a.delta(k) for a in arts]) for k in arts[0].meta.layout}
    if scales is None:
        scales = [1.0 / len(arts) if rule == "mean" else 1.0] * len(arts)
    elif rule not in ("sum", "mean"):
        raise ValueError(f"unknown merge rule {rule!r}; use 'sum', 'mean' or 'ties'")
    return {k: sum(s * a.delta(k).float() for a, s in zip(arts, scales)) for k in arts[0].meta.layout}


@contextmanager
def residual_applied(base: Base, adapter: AdapterConfig, residual: dict[str, torch.Tensor],
                     arts: list[ConceptArtifact]) -> Iterator[None]:
    """W = W0 + residual on every target, every concept's trigger embeddings written, for the
    duration of the block; W0 and the embedding rows are restored exactly afterwards."""
    add_slot_tokens(base, adapter.num_slots, adapter.tokens_per_concept)
    targets = find_targets(base.pipe, adapter)
    saved = {k: lin.weight.detach().clone() for k, lin in targets.items() if k in residual}
    tables = [te.get_input_embeddings().weight for te in base.text_encoders]
    saved_tables = [t.detach().clone() for t in tables]
    try:
        with torch.no_grad():
            for k, dw in residual.items():
                targets[k].weight += dw.to(targets[k].weight.device, targets[k].weight.dtype)
            for a in arts:
                ids = token_ids(base, a.meta.slot, adapter.tokens_per_concept)
                for table, (comp, vec), te_ids in zip(tables, sorted(a.token_embeds().items()), ids):
                    table[te_ids] = vec.to(table.device, table.dtype)
        yield
    finally:
        with torch.no_grad():
            for k, w in saved.items():
                targets[k].weight.copy_(w)
            for t, s in zip(tables, saved_tables):
                t.copy_(s)
