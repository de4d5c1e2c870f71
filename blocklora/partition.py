"""Which output rows of a layer each slot owns.

Contiguous blocks (sizes differ by at most one when K does not divide m) so that a slot's rows
are a slice: training, merging and serving touch them with views, never gathers.
"""

from __future__ import annotations

import torch


def row_block(m: int, num_slots: int, slot: int) -> slice:
    """Rows of an m-row weight owned by `slot` of `num_slots`; disjoint across slots, covering all."""
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    if num_slots > m:
        raise ValueError(
            f"{num_slots} slots cannot share a layer with only {m} output rows: every slot needs "
            f"at least one row; use num_slots <= {m} or leave this layer out of the targets"
        )
    if not 0 <= slot < num_slots:
        raise ValueError(f"slot {slot} is out of range: this federation has slots 0..{num_slots - 1}")
    base, extra = divmod(m, num_slots)  # the first `extra` slots get one row more
    start = slot * base + min(slot, extra)
    return slice(start, start + base + (1 if slot < extra else 0))


def all_blocks(m: int, num_slots: int) -> list[slice]:
    """Every slot's rows, in slot order."""
    return [row_block(m, num_slots, k) for k in range(num_slots)]


def block_delta(b_rows: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """B_R A, the non-zero rows of a concept's dW: (|R|, r) @ (r, n) -> (|R|, n).

    Through `torch.bmm` on a batch of one, the routine the grouped merge runs on a batch of layers,
    so a layer's own dW and a merged one round alike: on some CPUs `mm` and `bmm` take different
    kernels for small shapes and differ in the last bit (seen at (2, 4) @ (4, 32) on a Xeon), while
    `bmm` computes each matrix of a batch the same way whatever the batch's size."""
    return torch.bmm(b_rows[None], a[None])[0]
