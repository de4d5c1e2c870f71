"""Per-request subsets of a concept library without re-merging: W0 stays untouched, each sample adds
only the residual rows of the concepts it asked for.

Concepts own disjoint row blocks, so for a batch whose sample b asks for concepts S_b (pairwise
different slots) with weights α_b, every target linear computes

    h_b = W0 x_b + Σ_{i ∈ S_b} α_{b,i} (M_i ⊙ B_i) A_i x_b,

which is exactly what a pipeline merged with W0 + Σ_{i∈S_b} α_{b,i} dW_i computes (up to float
rounding), while samples with other subsets share the same forward pass. The bank holds any number
of concepts, several per slot (a replica's cache of a library: serve/concept_cache.py decides which),
each as its A (r, n) and owned rows of B (|R|, r) per layer. Once per batch (not per step: the
denoising loop reuses it) the concepts the batch uses, E, are stacked: A_E (|E|·r, n) and a
block-structured B_E (m, |E|·r) whose column group e is non-zero only on concept e's rows. Each
sample gathers only its own concepts' columns, α folded into B, padded to the largest subset s:
A_b (s·r, n) and α_b B_b (m, s·r). A layer's residual is then two batched matmuls, x_b A_bᵀ and
(·)(α_b B_b)ᵀ accumulated into the base output in place (Punica/S-LoRA's gather-then-BGMV), so the
extra cost is s·r·(n + m) per token — the sample's own subset, not the union of the batch's.

The `union` kernel computes the same sum another way, for devices where skinny batched matmuls are
slow (the gathered path's two skinny bmm per layer on an H200: docs/results, serving on a GPU): one
plain matmul of the whole flattened batch against A_E, each sample's α as a broadcast multiply (zero
for the concepts it did not ask for), one matmul back into the output — |E|/s times the FLOPs of
`gathered`, in shapes BLAS runs near peak. Which is faster is a measurement
(benchmarks/serve_bench.py times both); `gathered` stays the default.

Trigger tokens are per slot, so a sample's `<blk3>` reads the vectors of *its* concept in slot 3.

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
from blocklora.method.slots import PipelineSlots, phrase

if TYPE_CHECKING:
    from blocklora.pipeline.base import Base

KERNELS = ("gathered", "union")  # how a layer adds its residual (module docstring)
Factors = tuple[slice, torch.Tensor, torch.Tensor]  # a concept's rows R, A (r, n), B_R (|R|, r) in one layer


class SlotWeights:
    """What the forward pass in flight adds, shared by every `SlotResidualLinear` of one pipeline:
    the concepts the batch uses (`used`, the bank's keys, E), each sample's weight on each of them
    (`alpha`, (B, |E|)) and each sample's concepts padded to the largest subset (`chosen`, (B, s)).
    `epoch` changes whenever any of it changes, so each layer rebuilds its stacks once per batch,
    not once per call. `kernel` (one of `KERNELS`) is how every layer adds its residual."""

    def __init__(self) -> None:
        self.kernel = KERNELS[0]
        self.alpha: torch.Tensor | None = None  # (B, |E|); None: no residual at all
        self.used: list[str] = []
        self.chosen: torch.Tensor = torch.zeros(0, 0, dtype=torch.long)
        self.epoch = 0

    def set(self, used: list[str], alpha: torch.Tensor | None) -> None:
        if alpha is not None and (alpha.dim() != 2 or alpha.shape[1] != len(used)):
            raise ValueError(f"weights must be (batch, {len(used)}), got {tuple(alpha.shape)}")
        if alpha is not None and alpha.ne(0).any():
            nonzero = alpha.ne(0)
            s = int(nonzero.sum(1).max())
            # each row: its sample's concepts first; the padding columns carry α = 0, so add nothing
            self.chosen = nonzero.int().argsort(dim=1, descending=True, stable=True)[:, :s]
            self.used = used
        else:
            alpha = None
        self.alpha = alpha
        self.epoch += 1


class SlotResidualLinear(nn.Module):
    """A frozen `nn.Linear` plus the residual of each sample's own concepts, weighted by its own α.

    The batch of a call may be a multiple of α's batch: with classifier-free guidance the UNet runs
    [uncond; cond], and both halves carry the concepts (as a merged pipeline's weights would), so
    sample i uses α's row i mod B. The factors are kept in the base weight's dtype (an fp16 base
    serves fp16 residuals, as its merged weights would be fp16).
    """

    def __init__(self, base: nn.Linear, key: str, rank: int, weights: SlotWeights,
                 factors: Mapping[str, Mapping[str, Factors]]) -> None:
        super().__init__()
        self.base, self.key, self.rank, self.weights = base, key, rank, weights
        self.factors = factors  # the bank's: concept key -> layer key -> (R, A, B_R)
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

    def _stacks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A_E (|E|·r, n) and B_Eᵀ (|E|·r, m) of the batch's concepts, B zero outside each one's rows."""
        parts = [self.factors[name][self.key] for name in self.weights.used]
        a_all = torch.cat([a for _, a, _ in parts])  # (|E|·r, n)
        b_t = a_all.new_zeros(a_all.shape[0], self.base.out_features)  # (|E|·r, m)
        for e, (rows, _, b_rows) in enumerate(parts):
            b_t[e * self.rank:(e + 1) * self.rank, rows] = b_rows.T
        return a_all, b_t

    def _factors(self) -> tuple[torch.Tensor, ...]:
        """Gathered once per batch (per `weights.epoch`):
        gathered: A_bᵀ (B, n, s·r) and (α_b B_b)ᵀ (B, s·r, m), each sample's own concepts;
        union: A_E (|E|·r, n) and B_Eᵀ (|E|·r, m), and α per sample and column (B, |E|·r)."""
        if self._epoch != self.weights.epoch or self._gathered is None:
            w, r = self.weights, self.rank
            a_all, b_t = self._stacks()
            span = torch.arange(r, device=a_all.device)
            alpha = w.alpha.to(a_all.device)
            if self.kernel == "union":
                self._gathered = (a_all, b_t, alpha.repeat_interleave(r, dim=1).to(a_all))
            else:
                chosen = w.chosen.to(a_all.device)
                cols = (chosen[..., None] * r + span).flatten(1)  # (B, s·r)
                scale = alpha.gather(1, chosen).repeat_interleave(r, dim=1)  # (B, s·r)
                self._gathered = (a_all[cols].transpose(1, 2).contiguous(),  # (B, n, s·r)
                                  (b_t[cols] * scale[..., None].to(b_t)).contiguous())  # (B, s·r, m)
            self._epoch = w.epoch
        return self._gathered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.weights.alpha is None:
            return out
        factors = self._factors()
        n, batch = x.shape[0], self.weights.alpha.shape[0]
        if n % batch:
            raise RuntimeError(f"a batch of {n} cannot carry concept weights set for {batch} samples")
        rep = n // batch  # CFG: [uncond; cond] both carry the request's concepts
        if self.kernel == "union":
            a, b_t, alpha = factors
            u = torch.nn.functional.linear(x.reshape(n, -1, x.shape[-1]).to(a.dtype), a)  # (N, L, |E|·r)
            u.mul_(alpha.repeat(rep, 1)[:, None, :])  # each sample's α; 0 on the concepts it did not ask for
            out.view(-1, out.shape[-1]).addmm_(u.view(-1, u.shape[-1]).to(out.dtype), b_t.to(out.dtype))
            return out
        a_t, b_t = factors
        if rep != 1:
            a_t, b_t = a_t.repeat(rep, 1, 1), b_t.repeat(rep, 1, 1)
        u = torch.bmm(x.reshape(n, -1, x.shape[-1]).to(a_t.dtype), a_t)  # (N, L, s·r)
        flat = out.view(n, -1, out.shape[-1])  # (N, L, m), the same storage as out
        flat.baddbmm_(u.to(out.dtype), b_t.to(out.dtype))  # += (α B) u: zero outside the chosen concepts' rows
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class SlotTokenEmbedding(nn.Module):
    """A token embedding whose slot trigger ids read, in each sample, the vectors of that sample's
    concept in the slot; samples that asked for no concept in it read the base table, as in a
    pipeline merged without it. The table itself is never written, so no request sees another's
    triggers."""

    def __init__(self, base: nn.Embedding, ids: list[list[int]]) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=base.weight.device),
                             persistent=False)  # (K, t)
        self.vectors: torch.Tensor | None = None  # (B, K, t, d) of the batch in flight
        self.wants: torch.Tensor | None = None  # (B, K): sample b has a concept in slot k

    @property
    def weight(self) -> torch.Tensor:  # transformers reads .weight of the input embeddings
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        if self.wants is None:
            return out
        batch = self.wants.shape[0]
        if input_ids.shape[0] % batch:
            raise RuntimeError(f"a batch of {input_ids.shape[0]} prompts cannot carry concepts set for {batch} samples")
        rep = input_ids.shape[0] // batch
        wants, vectors = self.wants.repeat(rep, 1), self.vectors.repeat(rep, 1, 1, 1)
        for k in wants.any(0).nonzero().flatten().tolist():
            for j, tok in enumerate(self.ids[k].tolist()):
                hit = (input_ids == tok).unsqueeze(-1) & wants[:, k, None, None]  # (B, L, 1)
                out = torch.where(hit, vectors[:, k, j, None, :].to(out.dtype), out)
        return out


class ConceptBank:
    """Concepts' factors and trigger vectors held beside a pipeline's serving layers, any number of
    them and several per slot, addressable per sample: `subsets` runs one batch in which sample b
    carries exactly the concepts it names (pairwise different slots).

    `add`/`remove` touch one concept's tensors: the base is loaded once, and nothing else changes
    when the held set does. Keys are the caller's (a replica keys by name and artifact digest, so a
    replaced concept and its successor can be held side by side).
    """

    def __init__(self, base: Base, adapter: AdapterConfig, kernel: str = "gathered") -> None:
        if not adapter.blockwise:
            raise ValueError("ConceptBank needs blockwise concepts (disjoint rows); plain LoRAs overlap")
        self.base, self.adapter = base, adapter
        self.slots = PipelineSlots(base, adapter)
        self.weights = SlotWeights()
        self.factors: dict[str, dict[str, Factors]] = {}
        self.triggers: dict[str, dict[str, torch.Tensor]] = {}  # key -> text-encoder component -> (t, d)
        self.embeddings: dict[str, SlotTokenEmbedding] = {}
        for comp, te in base.text_encoders.items():
            emb = SlotTokenEmbedding(te.get_input_embeddings(), self.slots.token_ids[comp])
            te.set_input_embeddings(emb)
            self.embeddings[comp] = emb
        self.layers: dict[str, SlotResidualLinear] = {}
        for key, lin in self.slots.targets.items():
            layer = SlotResidualLinear(lin, key, adapter.rank, self.weights, self.factors)
            set_module(base.pipe, key, layer)
            self.layers[key] = layer
        self.live: dict[str, ConceptArtifact] = {}  # key -> the artifact it was made from (metadata only is read)
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

    def nbytes(self, key: str) -> int:
        """What one held concept costs this replica (its factors and trigger vectors)."""
        tensors = [t for _, a, b in self.factors[key].values() for t in (a, b)] + list(self.triggers[key].values())
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.no_grad()
    def add(self, art: ConceptArtifact, key: str | None = None) -> str:
        """Hold `art` under `key` (default its name); refused if it does not fit this base."""
        key = art.name if key is None else key
        if key in self.live:
            raise ValueError(f"concept {key!r} is already live in this bank; remove it first")
        self.slots.check(art)
        like = next(iter(self.layers.values())).base.weight
        self.factors[key] = {k: (art.rows(k), *(t.to(like.device, like.dtype) for t in art.factors(k)))
                             for k in self.layers}
        self.triggers[key] = {comp: vec.to(self.embeddings[comp].base.weight)
                              for comp, (_, vec) in self.slots.triggers(art).items()}
        self.live[key] = art
        return key

    def remove(self, key: str) -> ConceptArtifact:
        if key not in self.live:
            raise KeyError(f"concept {key!r} is not live; live: {sorted(self.live)[:20]}")
        del self.factors[key], self.triggers[key]
        return self.live.pop(key)

    def alpha(self, subsets: list[Mapping[str, float]]) -> tuple[list[str], torch.Tensor]:
        """(the concepts used, E; weights (B, |E|)) for one subset {key: α} per sample; unknown keys
        raise KeyError, two concepts of one slot in a sample ValueError."""
        used = list(dict.fromkeys(k for subset in subsets for k in subset))
        for k in used:
            if k not in self.live:
                raise KeyError(f"concept {k!r} is not live; live: {sorted(self.live)[:20]}")
        alpha = torch.zeros(len(subsets), len(used))
        for b, subset in enumerate(subsets):
            slots: dict[int, str] = {}
            for k, w in subset.items():
                slot = self.live[k].meta.slot
                if slot in slots:
                    raise ValueError(f"concepts {slots[slot]!r} and {k!r} are both in slot {slot}; one sample "
                                     "merges at most one concept per slot")
                slots[slot] = k
                alpha[b, used.index(k)] = float(w)
        return used, alpha

    @contextmanager
    def subsets(self, subsets: list[Mapping[str, float]]) -> Iterator[None]:
        """Run the pipeline for one batch, sample b carrying exactly the concepts of subsets[b]."""
        used, alpha = self.alpha(subsets)
        self.weights.set(used, alpha)
        for comp, emb in self.embeddings.items():
            t, d = emb.ids.shape[1], emb.base.weight.shape[1]
            emb.vectors = emb.base.weight.new_zeros(len(subsets), self.adapter.num_slots, t, d)
            emb.wants = torch.zeros(len(subsets), self.adapter.num_slots, dtype=torch.bool, device=emb.ids.device)
            for b, subset in enumerate(subsets):
                for k, w in subset.items():
                    if w != 0:
                        slot = self.live[k].meta.slot
                        emb.vectors[b, slot], emb.wants[b, slot] = self.triggers[k][comp], True
            if not emb.wants.any():
                emb.vectors = emb.wants = None
        try:
            yield
        finally:
            self.weights.set([], None)
            for emb in self.embeddings.values():
                emb.vectors = emb.wants = None

    def phrases(self) -> dict[str, str]:
        """Concept key -> what `{name}` in a prompt expands to, e.g. '<blk3> dog'."""
        return {k: phrase(a) for k, a in self.live.items()}
