"""Which output rows of a layer each slot owns.

A slot's rows are always a slice (sizes differ by at most one when K does not divide m), so that
training, merging and serving touch them with views, never gathers. Two layouts:
- "block": one contiguous run per slot (rows 0..m/K for slot 0, ...);
- "strided": every K-th row (slot k owns k, k+K, k+2K, ...). In an attention projection a block of a
  few rows lies inside one head; strided rows spread a slot over every head (docs/results/variants.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blocklora.config import ROW_LAYOUTS


def row_block(m: int, num_slots: int, slot: int, layout: str = "block") -> slice:
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
    if layout == "strided":
        return slice(slot, m, num_slots)
    if layout != "block":
        raise ValueError(f"unknown row layout {layout!r}; known: {', '.join(ROW_LAYOUTS)}")
    base, extra = divmod(m, num_slots)  # the first `extra` slots get one row more
    start = slot * base + min(slot, extra)
    return slice(start, start + base + (1 if slot < extra else 0))


def owned_rows(m: int, num_slots: int, slot: int, blockwise: bool = True, layout: str = "block") -> slice:
    """The rows of an m-row weight that a concept's B owns: its slot's rows, or all of them for a
    plain LoRA (blockwise off, the Table 3 ablation)."""
    return row_block(m, num_slots, slot, layout) if blockwise else slice(0, m)


def row_count(rows: slice, m: int) -> int:
    """How many of an m-row weight's rows `rows` selects (|R|)."""
    return len(range(m)[rows])


def all_blocks(m: int, num_slots: int, layout: str = "block") -> list[slice]:
    """Every slot's rows, in slot order."""
    return [row_block(m, num_slots, k, layout) for k in range(num_slots)]


def widen(values: torch.Tensor, rows: slice, m: int) -> torch.Tensor:
    """The m-wide tensor holding `values` (..., |R|) in the columns `rows` and zeros elsewhere.

    Built with F.pad alone, so its backward is a narrow of the gradient (a view), never a scatter;
    a strided slice pads each value to a group of `step` and flattens the groups."""
    start, stop, step = rows.indices(m)
    if step == 1:
        return F.pad(values, (start, m - stop))
    grouped = F.pad(values.unsqueeze(-1), (start, step - 1 - start)).flatten(-2)  # (..., |R| * step)
    return F.pad(grouped, (0, m - grouped.shape[-1]))


def block_delta(b_rows: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """B_R A, the non-zero rows of a concept's dW: (|R|, r) @ (r, n) -> (|R|, n).

    Through `torch.bmm` on a batch of one, the routine the grouped merge runs on a batch of layers,
    so a layer's own dW and a merged one round alike: on some CPUs `mm` and `bmm` take different
    kernels for small shapes and differ in the last bit (seen at (2, 4) @ (4, 32) on a Xeon), while
    `bmm` computes each matrix of a batch the same way whatever the batch's size."""
    return torch.bmm(b_rows[None], a[None])[0]
