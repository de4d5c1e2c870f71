"""The BlockLoRA layer: a frozen `nn.Linear` plus one concept's blockwise low-rank residual.

h = W0 x + r(λ) ⊙ (M ⊙ B) A x, where M keeps only the rows R owned by the concept's slot.
Only those rows of B exist as a parameter (`lora_B` is |R| x r), so the residual costs
O(r (n + |R|)) per token instead of O(r (n + m)), and the other slots' rows are exactly zero
by construction rather than by masking.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from blocklora.method.partition import block_delta, owned_rows, row_count, widen


class BlockLoRALinear(nn.Module):
    """Wraps `base` (frozen) and owns A (r x n), the owned rows of B (|R| x r) and the erasure.

    Randomized output erasure (training only): each forward draws a fresh Bernoulli(1-λ) keep-mask
    over the output features, one mask per sample shared by all its tokens/pixels, because a
    concept merged with others sees whole features perturbed, not single activations. The kept
    features are NOT rescaled by 1/(1-λ): erasure teaches the residual that any of its features
    may be missing (as when another concept's rows dominate), it is not a dropout whose
    expectation must match eval, and rescaling would train a residual that overshoots once all
    features are present at merge time. Eval applies the full residual (no erasure).
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        num_slots: int,
        slot: int,
        erasure: float = 0.0,
        blockwise: bool = True,
        frozen_a: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        row_layout: str = "block",
    ) -> None:
        """`dtype` of A and B: None keeps the base weight's; float32 beside a half-precision base is
        mixed-precision training (the residual then runs in the half dtype under autocast)."""
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"BlockLoRALinear wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        m, n = base.out_features, base.in_features
        self.rank, self.num_slots, self.slot, self.erasure = rank, num_slots, slot, erasure
        self.rows = owned_rows(m, num_slots, slot, blockwise, row_layout)
        dev, dt = base.weight.device, dtype or base.weight.dtype
        if frozen_a is not None:
            if frozen_a.shape != (rank, n):
                raise ValueError(f"frozen A must be {(rank, n)}, got {tuple(frozen_a.shape)}")
            self.lora_A = nn.Parameter(frozen_a.to(dev, dt), requires_grad=False)
        else:
            self.lora_A = nn.Parameter(torch.empty(rank, n, device=dev, dtype=dt))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft: A random, B zero
        n_rows = row_count(self.rows, m)
        self.lora_B = nn.Parameter(torch.zeros(n_rows, rank, device=dev, dtype=dt))  # (|R|, r)
        self.scale = 1.0
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Ordinary tensor ops on (tokens, features) matrices, so every backward node is autograd's
        own C++ one: where a step is bound by kernel launches (a GPU at small latents) a Python
        autograd node costs more than the ops it saves (docs/results/training-cost.md). The residual joins the
        output as `out + widen(res)`, not `out[..., R] += res`, whose CopySlices would rebuild the
        output's gradient at full size twice; widen's backward is a view of R's columns."""
        out = self.base(x)
        if self.merged or self.scale == 0.0:
            return out
        h = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype).mm(self.lora_A.t())  # (tokens, r); autocast's dtype
        res = h.mm(self.lora_B.to(h.dtype).t())  # (tokens, |R|)
        if self.training and self.erasure > 0:
            # one keep-mask per sample over this concept's output features, shared by its tokens
            res = res.view(x.shape[0], -1, res.shape[-1])
            keep = torch.rand(x.shape[0], 1, res.shape[-1], device=res.device).ge_(self.erasure)
            res = res * keep.to(res.dtype)  # 1.0 kept, 0.0 erased
        if self.scale != 1.0:
            res = res * self.scale
        return out + widen(res.to(out.dtype), self.rows, out.shape[-1]).view(out.shape)

    def delta_rows(self) -> torch.Tensor:
        """The rows R of scale · dW that can be non-zero: scale · B_R A, shape (|R|, n)."""
        return self.scale * block_delta(self.lora_B, self.lora_A)

    def delta_weight(self) -> torch.Tensor:
        """The exact scale · dW = scale · (M ⊙ B) A as a dense m x n matrix (rows outside R are zero)."""
        m, n = self.base.out_features, self.base.in_features
        dw = torch.zeros(m, n, device=self.lora_A.device, dtype=self.lora_A.dtype)
        dw[self.rows] = self.delta_rows()
        return dw

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the residual into the base weight's owned rows (kept for an exact unmerge)."""
        if self.merged:
            raise RuntimeError("BlockLoRALinear is already merged")
        self._saved_rows = self.base.weight[self.rows].clone()
        self.base.weight[self.rows] += self.delta_rows().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base rows bit for bit (a subtraction would leave rounding error)."""
        if not self.merged:
            raise RuntimeError("BlockLoRALinear is not merged")
        self.base.weight[self.rows] = self._saved_rows
        del self._saved_rows
        self.merged = False

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, slot={self.slot}/{self.num_slots}, "
                f"rows={self.rows.start}:{self.rows.stop}:{self.rows.step or 1}, erasure={self.erasure}")
