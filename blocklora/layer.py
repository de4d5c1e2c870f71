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

from blocklora.partition import block_delta, owned_rows, row_count


def _mm_grads(grad: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor,
              need1: bool, need2: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of `mat1.mm(mat2)` exactly as autograd's mm backward computes them (torch's
    mm_mat1_backward / mm_mat2_backward: a column-major operand gets a column-major gradient), so
    the same BLAS calls on the same layouts give the same bits."""
    g1 = g2 = None
    if need1:
        col_major = mat1.stride(0) == 1 and mat1.stride(1) == mat1.shape[0]
        g1 = mat2.mm(grad.t()).t() if col_major else grad.mm(mat2.t())
    if need2:
        col_major = mat2.stride(0) == 1 and mat2.stride(1) == mat2.shape[0]
        g2 = grad.t().mm(mat1).t() if col_major else mat1.t().mm(grad)
    return g1, g2


class _RowResidual(torch.autograd.Function):
    """`out` with scale · keep ⊙ h Bᵀ added to its rows R, as one autograd node (h = x Aᵀ).

    Why a node of its own: as tensor expressions this tail is ~8 autograd nodes per layer, and the
    in-place `out[..., R] +=` makes autograd rebuild `out`'s gradient twice (two CopySlices, each
    with a full-size zeros tensor). This node runs the kernels autograd ran for that expression
    (the same mm calls on the same layouts), so outputs and gradients are bit-identical to it; it
    hands `out`'s gradient through untouched and reads only its R columns.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, h: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None,
                scale: float, rows: slice) -> torch.Tensor:
        h2d = h.reshape(-1, h.shape[-1])  # (tokens, r): a view, h is a fresh matmul result
        res = h2d.mm(b.t()).view(*h.shape[:-1], b.shape[0])  # (..., |R|)
        if keep is not None:
            res.mul_(keep)
        if scale != 1.0:
            res.mul_(scale)
        new = out.clone()
        new[..., rows].add_(res.to(out.dtype))
        ctx.save_for_backward(h2d, b, keep)
        ctx.scale, ctx.rows, ctx.h_shape = scale, rows, h.shape
        return new

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h2d, b, keep = ctx.saved_tensors
        g = grad[..., ctx.rows].to(b.dtype)
        if ctx.scale != 1.0:
            g = g * ctx.scale
        if keep is not None:
            g = g * keep
        g = g.contiguous().view(-1, b.shape[0])  # (tokens, |R|)
        g_h, g_bt = _mm_grads(g, h2d, b.t(), ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return (grad, None if g_h is None else g_h.view(ctx.h_shape), None if g_bt is None else g_bt.t(),
                None, None, None)


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
        out = self.base(x)
        if self.merged or self.scale == 0.0:
            return out
        h = x.to(self.lora_A.dtype) @ self.lora_A.T  # (..., r); under autocast in its dtype
        keep = None
        if self.training and self.erasure > 0:
            # one keep-mask per sample over this concept's output features, broadcast over tokens
            shape = (h.shape[0],) + (1,) * (h.dim() - 2) + (self.lora_B.shape[0],)
            keep = torch.rand(shape, device=h.device).ge_(self.erasure).to(h.dtype)  # 1.0 kept, 0.0 erased
        return _RowResidual.apply(out, h, self.lora_B.to(h.dtype), keep, self.scale, self.rows)

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
