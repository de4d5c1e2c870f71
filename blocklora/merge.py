"""Instant, exact merging of any set of BlockLoRA concepts into a loaded pipeline.

Because concepts own disjoint rows, merging concept i is W[R_i] = W0[R_i] + α_i B_i A_i: it reads
and writes only i's rows, never depends on which other concepts are live or in what order they
came, and removing i writes W0[R_i] back bit for bit (saved on add, never recomputed).

Speed: a UNet has ~100+ target linears but only a handful of distinct shapes (SD1.5: 128 targets, 6
shapes), so the per-layer work is batched per shape group: one stacked A, one stacked B_R, one
`bmm` for every ΔW rows of the group, one stack for the saved rows and one foreach add/copy into
the weights. An add or remove costs a few ops per group plus its rows' memory traffic, not a
Python round trip per layer. Each layer's own ΔW rows go through the same `bmm` on a batch of one
(`partition.block_delta`; `mm` rounds differently on some CPUs), checked bit for bit in
tests/test_merge.py, so a merge equals the dense W0 + Σ α dW exactly.
"""

from __future__ import annotations

from collections import defaultdict
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
    saved_rows: dict[tuple, torch.Tensor]  # shape group -> W0's rows of its targets (G, |R|, n), base dtype
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
        # (m, n, dtype, device) -> the target keys of that shape, in module order
        groups: dict[tuple, list[str]] = defaultdict(list)
        for key, lin in self.targets.items():
            groups[(*lin.weight.shape, lin.weight.dtype, lin.weight.device)].append(key)
        self.groups: dict[tuple, list[str]] = dict(groups)
        self._buffers: dict[tuple, torch.Tensor] = {}

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
        saved: dict[tuple, torch.Tensor] = {}
        for group, keys in self.groups.items():
            rows = self._rows(art, keys)
            a, b = zip(*(art.factors(k) for k in keys))
            dev = rows[0].device
            delta = self._scratch(group, (len(keys), *rows[0].shape), dev)
            torch.bmm(torch.stack(b).to(dev, torch.float32), torch.stack(a).to(dev, torch.float32), out=delta)
            if scale != 1.0:
                delta.mul_(scale)
            saved[group] = torch.empty(delta.shape, dtype=rows[0].dtype, device=dev)  # W0 rows, base dtype
            torch._foreach_copy_(list(saved[group].unbind(0)), rows)
            # in place, computed in fp32 and rounded once to the base's dtype: W[R] = W0[R] + α ΔW_R
            torch._foreach_add_(rows, list(delta.unbind(0)))
        self.live[art.name] = _Live(art, scale, saved, self.slots.write_triggers(art))

    def _scratch(self, group: tuple, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The fp32 buffer a group's ΔW rows are computed into, kept between adds: one concept's
        rows in fp32 per group whatever the number live. Writing into a warm buffer instead of a
        fresh allocation halves an add on CPU (no page faults on tens of MB)."""
        buf = self._buffers.get(group)
        if buf is None or buf.shape != shape:
            buf = self._buffers[group] = torch.empty(shape, dtype=torch.float32, device=device)
        return buf

    def _rows(self, art: ConceptArtifact, keys: list[str]) -> list[torch.Tensor]:
        """Views of art's rows (|R|, n) in the weights of `keys`: contiguous, since rows are a block."""
        return [self.targets[k].weight[art.rows(k)] for k in keys]

    @torch.no_grad()
    def remove(self, name: str) -> ConceptArtifact:
        if name not in self.live:
            raise KeyError(f"concept {name!r} is not merged; merged: {sorted(self.live)}")
        lv = self.live.pop(name)
        for group, keys in self.groups.items():
            torch._foreach_copy_(self._rows(lv.artifact, keys), list(lv.saved_rows[group].unbind(0)))
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
