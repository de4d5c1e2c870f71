"""The paired bootstrap behind every interval the benchmarks report."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.stats import mean_diff, mean_ratio, paired_bootstrap


def per_draw(arrays, statistic, draws=2000, seed=0):
    """The definition, one resample at a time (the same seeded indices): concepts with replacement,
    then seeds within each drawn concept, the statistic of each resample."""
    rng, (c, s) = np.random.default_rng(seed), arrays[0].shape
    rows, cols = rng.integers(c, size=(draws, c, 1)), rng.integers(s, size=(draws, c, s))
    out = [float(statistic(*(a[rows[k], cols[k]] for a in arrays))) for k in range(draws)]
    return np.percentile(out, [2.5, 97.5])


@pytest.mark.parametrize("statistic", [mean_diff, mean_ratio])
def test_batched_draws_equal_the_draw_by_draw_definition(statistic):
    rng = np.random.default_rng(3)
    a, b = rng.random((16, 3)) + 0.5, rng.random((16, 3)) + 0.5
    got = paired_bootstrap([a, b], statistic)
    assert got.estimate == pytest.approx(float(statistic(a, b)))
    assert [got.low, got.high] == pytest.approx(per_draw([a, b], statistic), abs=1e-12)
    assert got.low <= got.estimate <= got.high


def test_pairing_cancels_what_both_arms_share():
    """b is a plus a constant: every paired draw sees the same difference, so the interval is a point."""
    a = np.random.default_rng(0).random((8, 3))
    got = paired_bootstrap([a + 0.25, a], mean_diff)
    assert (got.low, got.estimate, got.high) == pytest.approx((0.25, 0.25, 0.25))


def test_unpaired_shapes_are_refused():
    with pytest.raises(ValueError, match="concepts, seeds"):
        paired_bootstrap([np.zeros((4, 3)), np.zeros((4, 2))], mean_diff)
