"""Instant, exact merging of any set of BlockLoRA concepts into a loaded pipeline.

Because concepts own disjoint rows, merging concept i is W[R_i] = W0[R_i] + α_i B_i A_i: it reads
and writes only i's rows, never depends on which other concepts are live or in what order they
came, and removing i writes W0[R_i] back bit for bit (saved on add, never recomputed).

Speed: a UNet has ~100+ target linears but only a handful of distinct shapes (SD1.5: 128 targets, 6
shapes), so the per-layer work is batched over chunks of same-shaped layers: one stacked A, one
stacked B_R, one `bmm` for the chunk's ΔW rows into a kept fp32 buffer, one foreach copy of W0's rows
and one foreach add. How big a chunk is depends on what bounds an add:
- on a GPU, kernel launches: a chunk is a whole shape group (a few ops per shape, not per layer);
- on a CPU, memory traffic: an add passes over a concept's rows three times (save W0's, compute ΔW,
  add), tens of MB at SD1.5 shapes. Chunks of about `CPU_CHUNK_BYTES` of rows, with one ΔW buffer
  re-used by every chunk, keep the second and third pass in cache, which made an add faster than
  whole shape groups or a buffer per group (docs/results: the merge on a CPU, chunked add).
Each layer's ΔW rows go through the same `bmm` on a batch of one (`partition.block_delta`; `mm`
rounds differently on some CPUs), checked bit for bit in tests/test_merge.py, so a merge equals the
dense W0 + Σ α dW exactly whatever the chunking.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from blocklora.config import AdapterConfig
from blocklora.method.artifact import ConceptArtifact
from blocklora.method.slots import PipelineSlots, phrases

if TYPE_CHECKING:
    from blocklora.pipeline.base import Base

CPU_CHUNK_BYTES = 2 * 1024 * 1024  # one concept's rows per chunk on a CPU: about a core's L2 cache


@dataclass
class _Live:
    artifact: ConceptArtifact
    scale: float
    saved_rows: list[torch.Tensor]  # W0's rows (|R|, n) of each target, in chunk order, base dtype
    saved_triggers: dict[str, torch.Tensor]  # text-encoder component -> the table rows of the triggers


class LiveMerge:
    """Owns the set of concepts merged into `base.pipe`; add/remove are O(concept), not O(set)."""

    def __init__(self, base: Base, adapter: AdapterConfig) -> None:
        if not adapter.blockwise:
            raise ValueError("LiveMerge needs blockwise concepts (disjoint rows); plain LoRAs overlap — "
                             "merge them with benchmarks.baselines.merge_deltas instead")
        self.base, self.adapter = base, adapter
        self.slots = PipelineSlots(base, adapter)
        self.live: dict[str, _Live] = {}
        self.chunks = self._chunk(adapter.num_slots)
        self._keys = [k for keys in self.chunks for k in keys]  # every target, in chunk order
        self._linears = [self.targets[k] for k in self._keys]
        self._views: dict[int, tuple[tuple[int, ...], list[torch.Tensor]]] = {}
        self._buffers: dict[torch.device, torch.Tensor] = {}

    @property
    def targets(self) -> dict[str, nn.Linear]:
        """Target key -> the linear whose weight holds W0 + Σ α dW."""
        return self.slots.targets

    def _chunk(self, num_slots: int) -> list[list[str]]:
        """Target keys split into runs of one shape, dtype and device, in module order; on a CPU
        each run holds at most CPU_CHUNK_BYTES of one slot's rows (a single layer may exceed it)."""
        groups: dict[tuple, list[str]] = defaultdict(list)
        for key, lin in self.targets.items():
            groups[(*lin.weight.shape, lin.weight.dtype, lin.weight.device)].append(key)
        chunks = []
        for (m, n, dtype, device), keys in groups.items():
            per_layer = -(-m // num_slots) * n * dtype.itemsize
            size = len(keys) if device.type != "cpu" else max(1, CPU_CHUNK_BYTES // per_layer)
            chunks += [keys[i:i + size] for i in range(0, len(keys), size)]
        return chunks

    def check(self, art: ConceptArtifact) -> None:
        """Everything `add` would refuse, without touching the pipeline."""
        self.slots.check(art, {n: lv.artifact.meta.slot for n, lv in self.live.items()})

    @torch.no_grad()
    def add(self, art: ConceptArtifact, scale: float = 1.0) -> None:
        self.check(art)
        if not torch.isfinite(torch.tensor(scale)):
            raise ValueError(f"scale must be finite, got {scale}")
        rows = self._rows(art)
        # one allocation per layer: on a CPU, blocks of a few hundred KB come back warm from the heap,
        # while one per chunk (MBs) was mapped afresh and page-faulted on every add
        saved = [torch.empty_like(r) for r in rows]
        start = 0
        for keys in self.chunks:
            end = start + len(keys)
            views, keep, start = rows[start:end], saved[start:end], end
            a, b = zip(*(art.factors(k) for k in keys))
            dev = views[0].device
            delta = self._scratch(torch.Size((len(keys), *views[0].shape)), dev)
            torch.bmm(torch.stack(b).to(dev, torch.float32), torch.stack(a).to(dev, torch.float32), out=delta)
            if scale != 1.0:
                delta.mul_(scale)
            torch._foreach_copy_(keep, views)
            # in place, computed in fp32 and rounded once to the base's dtype: W[R] = W0[R] + α ΔW_R
            torch._foreach_add_(views, list(delta.unbind(0)))
        self.live[art.name] = _Live(art, scale, saved, self.slots.write_triggers(art))

    def _scratch(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The fp32 buffer a chunk's ΔW rows are computed into: one per device, as large as the
        largest chunk, kept between chunks and adds. Re-used, it is warm (no page faults on tens of
        MB) and on a CPU stays in cache from one chunk to the next."""
        numel = shape.numel()
        buf = self._buffers.get(device)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[device] = torch.empty(numel, dtype=torch.float32, device=device)
        return buf[:numel].view(shape)

    def _rows(self, art: ConceptArtifact) -> list[torch.Tensor]:
        """Views of art's rows (|R|, n) in the target weights, in chunk order (contiguous: rows are
        a block). Kept per slot, since taking 128 views costs more than copying a small layer's
        rows; taken again if any weight was replaced or moved since."""
        weights = [lin.weight for lin in self._linears]
        where = tuple(w.data_ptr() for w in weights)
        cached = self._views.get(art.meta.slot)
        if cached is None or cached[0] != where:
            cached = self._views[art.meta.slot] = (where, [w[art.rows(k)] for k, w in zip(self._keys, weights)])
        return cached[1]

    @torch.no_grad()
    def remove(self, name: str) -> ConceptArtifact:
        if name not in self.live:
            raise KeyError(f"concept {name!r} is not merged; merged: {sorted(self.live)}")
        lv = self.live.pop(name)
        torch._foreach_copy_(self._rows(lv.artifact), lv.saved_rows)
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
