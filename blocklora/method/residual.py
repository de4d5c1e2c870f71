"""Per-request subsets of live concepts without re-merging: W0 stays untouched, each sample adds
only the residual rows of the concepts it asked for.

Concepts own disjoint row blocks, so for a batch whose sample b asks for slots S_b with weights
α_b, every target linear computes

    h_b = W0 x_b + Σ_{k ∈ S_b} α_{b,k} (M_k ⊙ B_k) A_k x_b,

which is exactly what a pipeline merged with W0 + Σ_{k∈S_b} α_{b,k} dW_k computes (up to float
rounding), while samples with other subsets share the same forward pass. Each layer keeps every
slot's factors stacked — A_all (K·r, n) and a block-structured B_all (m, K·r) whose column group k
is non-zero only on slot k's rows. Once per batch (not per step: the denoising loop reuses it) each
sample gathers only its own slots' columns, α folded into B, padded to the largest subset s:
A_b (s·r, n) and α_b B_b (m, s·r). A layer's residual is then two batched matmuls, x_b A_bᵀ and
(·)(α_b B_b)ᵀ accumulated into the base output in place (Punica/S-LoRA's gather-then-BGMV), so the
extra cost is s·r·(n + m) per token — the sample's own subset, not the union of the batch's.

The `union` kernel computes the same sum another way, for devices where skinny batched matmuls are
slow (the gathered path's two skinny bmm per layer on an H200: docs/results, serving on a GPU): one
plain matmul of the whole flattened batch against every active slot's A (|active|·r columns), each
sample's α as a broadcast multiply (zero for the slots it did not ask for), one matmul back into the
output — |active|/s times the FLOPs of `gathered`, in shapes BLAS runs near peak. Which is faster is
a measurement (benchmarks/serve_bench.py times both); `gathered` stays the default.

Nothing here knows about Ray; `serve/generator.py` drives a `ConceptBank` from a replica.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Mapping

import torch
from torch import nn

from blocklora.config import AdapterConfig
from blocklora.method.artifact import ConceptArtifact
from blocklora.method.inject import set_module
from blocklora.method.slots import PipelineSlots, phrases

if TYPE_CHECKING:
    from blocklora.pipeline.base import Base

KERNELS = ("gathered", "union")  # how a layer adds its residual (module docstring)


class SlotWeights:
    """The per-sample slot weights α (batch, K) of the forward pass in flight, shared by every
    `SlotResidualLinear` of one pipeline. `epoch` changes whenever α or any slot's factors change,
    so each layer rebuilds its gathered factors once per batch, not once per call. `kernel` (one of
    `KERNELS`) is how every layer adds its residual."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.kernel = KERNELS[0]
        self.alpha: torch.Tensor | None = None  # (B, K); None: no residual at all
        self.active: torch.Tensor = torch.zeros(0, dtype=torch.long)  # slots with any non-zero α
        self.chosen: torch.Tensor = torch.zeros(0, 0, dtype=torch.long)  # (B, s): each sample's slots, padded
        self.epoch = 0

    def set(self, alpha: torch.Tensor | None) -> None:
        if alpha is not None:
            if alpha.dim() != 2 or alpha.shape[1] != self.num_slots:
                raise ValueError(f"slot weights must be (batch, {self.num_slots}), got {tuple(alpha.shape)}")
            nonzero = alpha.ne(0)
            active = nonzero.any(0).nonzero().flatten()
            if active.numel() == 0:
                alpha = None
            else:
                self.active = active
                s = int(nonzero.sum(1).max())
                # each row: its sample's slots first; the padding slots carry α = 0, so add nothing
                self.chosen = nonzero.int().argsort(dim=1, descending=True, stable=True)[:, :s]
        self.alpha = alpha
        self.epoch += 1


class SlotResidualLinear(nn.Module):
    """A frozen `nn.Linear` plus every live slot's residual, each sample weighted by its own α.

    The batch of a call may be a multiple of α's batch: with classifier-free guidance the UNet runs
    [uncond; cond], and both halves carry the concepts (as a merged pipeline's weights would), so
    sample i uses α's row i mod B. The factors are kept in the base weight's dtype (an fp16 base
    serves fp16 residuals, as its merged weights would be fp16).
    """

    def __init__(self, base: nn.Linear, rank: int, num_slots: int, weights: SlotWeights) -> None:
        super().__init__()
        self.base, self.rank, self.weights = base, rank, weights
        m, n = base.out_features, base.in_features
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.register_buffer("A_all", torch.zeros(num_slots * rank, n, **like), persistent=False)  # (K·r, n)
        self.register_buffer("B_all", torch.zeros(m, num_slots * rank, **like), persistent=False)  # (m, K·r)
        self._epoch = -1
        self._gathered: tuple[torch.Tensor, ...] | None = None

    @property
    def weight(self) -> torch.Tensor:  # diffusers and transformers read .weight / .bias of projections
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def kernel(self) -> str:
        return self.weights.kernel

    @torch.no_grad()
    def set_slot(self, slot: int, rows: slice, a: torch.Tensor, b_rows: torch.Tensor) -> None:
        """Install slot's A (r, n) and owned rows of B (|R|, r); touches only that slot's block."""
        cols = slice(slot * self.rank, (slot + 1) * self.rank)
        self.A_all[cols] = a.to(self.A_all)
        self.B_all[:, cols] = 0
        self.B_all[rows, cols] = b_rows.to(self.B_all)
        self._epoch = -1

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        cols = slice(slot * self.rank, (slot + 1) * self.rank)
        self.A_all[cols] = 0
        self.B_all[:, cols] = 0
        self._epoch = -1

    def _factors(self) -> tuple[torch.Tensor, ...]:
        """Gathered once per batch (per `weights.epoch`):
        gathered: A_bᵀ (B, n, s·r) and (α_b B_b)ᵀ (B, s·r, m), each sample's own slots;
        union: A (a·r, n) and Bᵀ (a·r, m) of the a active slots, and α per sample and column (B, a·r)."""
        if self._epoch != self.weights.epoch or self._gathered is None:
            w, r, dev = self.weights, self.rank, self.A_all.device
            span = torch.arange(r, device=dev)
            if self.kernel == "union":
                active = w.active.to(dev)
                cols = (active[:, None] * r + span).flatten()  # (a·r,)
                alpha = w.alpha.to(dev)[:, active].repeat_interleave(r, dim=1)  # (B, a·r)
                self._gathered = (self.A_all[cols], self.B_all.T[cols].contiguous(), alpha.to(self.A_all))
            else:
                chosen = w.chosen.to(dev)
                cols = (chosen[..., None] * r + span).flatten(1)  # (B, s·r)
                alpha = w.alpha.to(dev).gather(1, chosen).repeat_interleave(r, dim=1)  # (B, s·r)
                a_t = self.A_all[cols].transpose(1, 2).contiguous()  # (B, n, s·r)
                b_t = (self.B_all.T[cols] * alpha[..., None].to(self.B_all)).contiguous()  # (B, s·r, m)
                self._gathered = (a_t, b_t)
            self._epoch = w.epoch
        return self._gathered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.weights.alpha is None:
            return out
        factors = self._factors()
        n, batch = x.shape[0], self.weights.alpha.shape[0]
        if n % batch:
            raise RuntimeError(f"a batch of {n} cannot carry slot weights set for {batch} samples")
        rep = n // batch  # CFG: [uncond; cond] both carry the request's concepts
        if self.kernel == "union":
            a, b_t, alpha = factors
            u = torch.nn.functional.linear(x.reshape(n, -1, x.shape[-1]).to(a.dtype), a)  # (N, L, a·r)
            u.mul_(alpha.repeat(rep, 1)[:, None, :])  # each sample's α; 0 on the slots it did not ask for
            out.view(-1, out.shape[-1]).addmm_(u.view(-1, u.shape[-1]).to(out.dtype), b_t.to(out.dtype))
            return out
        a_t, b_t = factors
        if rep != 1:
            a_t, b_t = a_t.repeat(rep, 1, 1), b_t.repeat(rep, 1, 1)
        u = torch.bmm(x.reshape(n, -1, x.shape[-1]).to(a_t.dtype), a_t)  # (N, L, s·r)
        flat = out.view(n, -1, out.shape[-1])  # (N, L, m), the same storage as out
        flat.baddbmm_(u.to(out.dtype), b_t.to(out.dtype))  # += (α B) u: zero outside the chosen slots' rows
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, slots={self.A_all.shape[0] // self.rank}"


class SlotTokenEmbedding(nn.Module):
    """A token embedding whose slot trigger ids read the concept's vectors only in the samples that
    asked for the concept; everywhere else they read the base table, as in a pipeline merged
    without it. The table itself is never written, so no request sees another's triggers."""

    def __init__(self, base: nn.Embedding, ids: list[list[int]], weights: SlotWeights) -> None:
        super().__init__()
        self.base, self.weights = base, weights
        dev = base.weight.device
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=dev), persistent=False)  # (K, t)
        self.register_buffer("vectors", torch.zeros(*self.ids.shape, base.weight.shape[1], device=dev,
                                                    dtype=base.weight.dtype), persistent=False)  # (K, t, d)

    @property
    def weight(self) -> torch.Tensor:  # transformers reads .weight of the input embeddings
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        if self.weights.alpha is None:
            return out
        alpha = self.weights.alpha
        if input_ids.shape[0] % alpha.shape[0]:
            raise RuntimeError(f"a batch of {input_ids.shape[0]} prompts cannot carry slot weights "
                               f"set for {alpha.shape[0]} samples")
        alpha = alpha.repeat(input_ids.shape[0] // alpha.shape[0], 1).to(input_ids.device)
        for k in self.weights.active.tolist():
            wants = alpha[:, k].ne(0)[:, None, None]  # (B, 1, 1)
            for j, tok in enumerate(self.ids[k].tolist()):
                hit = (input_ids == tok).unsqueeze(-1) & wants  # (B, L, 1)
                out = torch.where(hit, self.vectors[k, j].to(out.dtype), out)
        return out


class ConceptBank:
    """Every live concept's factors and trigger vectors installed in a pipeline's serving layers,
    addressable per sample.

    `add`/`remove` touch one concept's slot (its factor columns and trigger vectors): the base is
    loaded once, and no other concept is re-merged when the set changes.
    """

    def __init__(self, base: Base, adapter: AdapterConfig, kernel: str = "gathered") -> None:
        if not adapter.blockwise:
            raise ValueError("ConceptBank needs blockwise concepts (disjoint rows); plain LoRAs overlap")
        self.base, self.adapter = base, adapter
        self.slots = PipelineSlots(base, adapter)
        self.weights = SlotWeights(adapter.num_slots)
        self.embeddings: dict[str, SlotTokenEmbedding] = {}
        for comp, te in base.text_encoders.items():
            emb = SlotTokenEmbedding(te.get_input_embeddings(), self.slots.token_ids[comp], self.weights)
            te.set_input_embeddings(emb)
            self.embeddings[comp] = emb
        self.layers: dict[str, SlotResidualLinear] = {}
        for key, lin in self.slots.targets.items():
            layer = SlotResidualLinear(lin, adapter.rank, adapter.num_slots, self.weights)
            set_module(base.pipe, key, layer)
            self.layers[key] = layer
        self.live: dict[str, ConceptArtifact] = {}
        self.kernel = kernel

    @property
    def kernel(self) -> str:
        return self.weights.kernel

    @kernel.setter
    def kernel(self, kernel: str) -> None:
        """Which of `KERNELS` every layer adds its residual with; the next batch re-gathers."""
        if kernel not in KERNELS:
            raise ValueError(f"unknown residual kernel {kernel!r}; known: {', '.join(KERNELS)}")
        self.weights.kernel = kernel
        self.weights.epoch += 1

    def slot_of(self, name: str) -> int:
        if name not in self.live:
            raise KeyError(name)
        return self.live[name].meta.slot

    def check(self, art: ConceptArtifact) -> None:
        """Everything `add` would refuse, without touching the pipeline."""
        self.slots.check(art, {n: a.meta.slot for n, a in self.live.items()})

    @torch.no_grad()
    def add(self, art: ConceptArtifact) -> None:
        self.check(art)
        slot = art.meta.slot
        for key, layer in self.layers.items():
            layer.set_slot(slot, art.rows(key), *art.factors(key))
        for comp, (_, vec) in self.slots.triggers(art).items():
            self.embeddings[comp].vectors[slot] = vec.to(self.embeddings[comp].vectors)
        self.live[art.name] = art
        self.weights.epoch += 1

    @torch.no_grad()
    def remove(self, name: str) -> ConceptArtifact:
        if name not in self.live:
            raise KeyError(f"concept {name!r} is not live; live: {sorted(self.live)}")
        art = self.live.pop(name)
        for layer in self.layers.values():
            layer.clear_slot(art.meta.slot)
        for emb in self.embeddings.values():
            emb.vectors[art.meta.slot] = 0
        self.weights.epoch += 1
        return art

    def alpha(self, subsets: list[Mapping[str, float]]) -> torch.Tensor:
        """(B, K) slot weights for one subset {name: α} per sample; unknown names raise KeyError."""
        alpha = torch.zeros(len(subsets), self.adapter.num_slots)
        for b, subset in enumerate(subsets):
            for name, w in subset.items():
                alpha[b, self.slot_of(name)] = float(w)
        return alpha

    @contextmanager
    def subsets(self, subsets: list[Mapping[str, float]]) -> Iterator[None]:
        """Run the pipeline for one batch, sample b carrying exactly the concepts of subsets[b]."""
        self.weights.set(self.alpha(subsets))
        try:
            yield
        finally:
            self.weights.set(None)

    def phrases(self) -> dict[str, str]:
        """Concept name -> what `{name}` in a prompt expands to, e.g. '<blk3> dog'."""
        return phrases(self.live.values())
