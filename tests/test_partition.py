import pytest
import torch

from blocklora.config import ROW_LAYOUTS
from blocklora.method.partition import all_blocks, row_block, row_count, widen


@pytest.mark.parametrize("layout", ROW_LAYOUTS)
@pytest.mark.parametrize("m,k", [(32, 16), (320, 16), (33, 16), (17, 16), (16, 16), (1280, 7), (5, 1)])
def test_blocks_are_disjoint_and_cover_all_rows(m, k, layout):
    blocks = all_blocks(m, k, layout)
    rows = [r for b in blocks for r in range(m)[b]]
    assert sorted(rows) == list(range(m))
    sizes = [row_count(b, m) for b in blocks]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_strided_rows_spread_a_slot_over_every_head():
    """128 rows in 8 heads of 16, 16 slots: a block is half of one head, strided rows one row per head."""
    heads = lambda rows: {r // 16 for r in range(128)[rows]}  # noqa: E731
    assert heads(row_block(128, 16, 3, "block")) == {1}  # rows 24..31
    assert heads(row_block(128, 16, 3, "strided")) == set(range(8))
    assert list(range(128)[row_block(128, 16, 3, "strided")])[:3] == [3, 19, 35]


def test_more_slots_than_rows_is_refused_clearly():
    with pytest.raises(ValueError, match="17 slots cannot share a layer with only 16 output rows"):
        row_block(16, 17, 0)


@pytest.mark.parametrize("slot", [-1, 16])
def test_slot_out_of_range(slot):
    with pytest.raises(ValueError, match="out of range"):
        row_block(64, 16, slot)


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="unknown row layout 'diagonal'"):
        row_block(64, 16, 0, "diagonal")


@pytest.mark.parametrize("m, k, layout", [(40, 8, "block"), (41, 8, "block"), (40, 8, "strided"), (43, 6, "strided")])
def test_widen_places_a_slots_values_in_its_rows_and_zeros_elsewhere(m, k, layout):
    for slot in range(k):
        rows = row_block(m, k, slot, layout)
        values = torch.randn(2, 3, row_count(rows, m), requires_grad=True)
        wide = widen(values, rows, m)
        want = torch.zeros(2, 3, m)
        want[..., rows] = values.detach()
        assert wide.shape == (2, 3, m) and torch.equal(wide, want)
        grad = torch.randn(2, 3, m)
        wide.backward(grad)
        assert torch.equal(values.grad, grad[..., rows])  # the backward reads the slot's columns only
