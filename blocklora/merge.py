"""Instant, exact merging of any set of BlockLoRA concepts into a loaded pipeline.

Because concepts own disjoint rows, merging concept i is W[R_i] = W0[R_i] + α_i B_i A_i: it reads
and writes only i's rows, never depends on which other concepts are live or in what order they
came, and removing i writes W0[R_i] back bit for bit (saved on add, never recomputed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from blocklora.artifact import ConceptArtifact
from blocklora.base import Base
from blocklora.config import AdapterConfig
from blocklora.slots import PipelineSlots, phrases


@dataclass
class _Live:
    artifact: ConceptArtifact
    scale: float
    saved_rows: dict[str, torch.Tensor]  # target key -> W0 rows
    saved_triggers: dict[str, torch.Tensor]  # text-encoder component -> the table rows of the triggers


class LiveMerge:
    """Owns the set of concepts merged into `base.pipe`; add/remove are O(concept), not O(set)."""

    def __init__(self, base: Base, adapter: AdapterConfig) -> None:
        if not adapter.blockwise:
            raise ValueError("LiveMerge needs blockwise concepts (disjoint rows); plain LoRAs overlap — "
                             "merge them with blocklora.baselines.merge_deltas instead")
        self.base, self.adapter = base, adapter
        self.slots = PipelineSlots(base, adapter)
        self.live: dict[str, _Live] = {}

    @property
    def targets(self) -> dict[str, nn.Linear]:
        """Target key -> the linear whose weight holds W0 + Σ α dW."""
        return self.slots.targets

    def check(self, art: ConceptArtifact) -> None:
        """Everything `add` would refuse, without touching the pipeline."""
        self.slots.check(art, {n: lv.artifact.meta.slot for n, lv in self.live.items()})

    @torch.no_grad()
    def add(self, art: ConceptArtifact, scale: float = 1.0) -> None:
        self.check(art)
        if not torch.isfinite(torch.tensor(scale)):
            raise ValueError(f"scale must be finite, got {scale}")
        saved: dict[str, torch.Tensor] = {}
        for key, lin in self.targets.items():
            rows = art.rows(key)
            saved[key] = lin.weight[rows].clone()
            delta = art.delta_rows(key).to(lin.weight.device, torch.float32)
            lin.weight[rows] = (saved[key].float() + scale * delta).to(lin.weight.dtype)
        self.live[art.name] = _Live(art, scale, saved, self.slots.write_triggers(art))

    @torch.no_grad()
    def remove(self, name: str) -> ConceptArtifact:
        if name not in self.live:
            raise KeyError(f"concept {name!r} is not merged; merged: {sorted(self.live)}")
        lv = self.live.pop(name)
        for key, lin in self.targets.items():
            lin.weight[lv.artifact.rows(key)] = lv.saved_rows[key]
        self.slots.restore_triggers(lv.artifact, lv.saved_triggers)
        return lv.artifact
    def set(self, arts: list[ConceptArtifact], scales: list[float] | str | None = None) -> None:
        """Make exactly `arts` live. scales: per-concept α (default 1.0 each), or "mean" for the
        paper's Σα = 1 convention (α = 1/|S|, which rescales every live concept on a change)."""
        if scales == "mean":
            scales = [1.0 / len(arts)] * len(arts) if arts else []
        scales = list(scales) if scales is not None else [1.0] * len(arts)
        if len(scales) != len(arts):
            raise ValueError(f"{len(arts)} concepts but {len(scales)} scales")
        wanted = {a.name: (a, s) for a, s in zip(arts, scales)}
        for name in [n for n, lv in self.live.items() if n not in wanted or lv.scale != wanted[n][1]
                     or lv.artifact is not wanted[n][0]]:
            self.remove(name)
        for name, (art, s) in wanted.items():
            if name not in self.live:
                self.add(art, s)

    def phrases(self) -> dict[str, str]:
        """Concept name -> what `{name}` in a prompt expands to, e.g. '<blk3> dog'."""
        return phrases(lv.artifact for lv in self.live.values())
