import pytest

from blocklora.partition import all_blocks, row_block


@pytest.mark.parametrize("m,k", [(32, 16), (320, 16), (33, 16), (17, 16), (16, 16), (1280, 7), (5, 1)])
def test_blocks_are_disjoint_and_cover_all_rows(m, k):
    rows = [r for b in all_blocks(m, k) for r in range(b.start, b.stop)]
    assert sorted(rows) == list(range(m))
    sizes = [b.stop - b.start for b in all_blocks(m, k)]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_more_slots_than_rows_is_refused_clearly():
    with pytest.raises(ValueError, match="17 slots cannot share a layer with only 16 output rows"):
        row_block(16, 17, 0)


@pytest.mark.parametrize("slot", [-1, 16])
def test_slot_out_of_range(slot):
    with pytest.raises(ValueError, match="out of range"):
        row_block(64, 16, slot)
