"""How sure is a comparison of two methods: paired bootstrap intervals over concepts x sampling seeds
(the retention study's and the other benchmarks' intervals). Weight-space overlap of a set of concepts,
which the CLI prints, is `blocklora.method.overlap`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A point estimate with its paired-bootstrap 95% interval."""

    estimate: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def paired_bootstrap(arrays: Sequence[np.ndarray], statistic: Callable[..., float | np.ndarray],
                     draws: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """Percentile bootstrap of `statistic(*arrays)` where every array is (concepts, seeds) and the
    arrays are paired cell by cell (same concept, same sampling seed).

    Resampling is two-level — concepts with replacement, then seeds within each drawn concept —
    and the same draw is applied to every array, so what varies between methods is compared on
    the same pictures' prompts and noise. Concepts are the unit that generalises; seeds only add
    sampling noise, which the inner level keeps in the interval.

    All draws are made and scored at once: `statistic` reduces the last two axes (as `mean_diff`
    does) of (draws, concepts, seeds) stacks. A report computes hundreds of intervals, and a Python
    call per draw made them a minute of CPU.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
    shape = arrays[0].shape
    if len(shape) != 2 or any(a.shape != shape for a in arrays):
        raise ValueError(f"paired arrays must all be (concepts, seeds); got {[a.shape for a in arrays]}")
    rng = np.random.default_rng(seed)
    c, s = shape
    rows = rng.integers(c, size=(draws, c, 1))  # concepts drawn with replacement
    cols = rng.integers(s, size=(draws, c, s))  # seeds redrawn within each drawn concept
    stats = np.asarray(statistic(*(a[rows, cols] for a in arrays)))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return Interval(float(statistic(*arrays)), float(low), float(high))


def mean(a: np.ndarray) -> float | np.ndarray:
    """Mean over the last two axes (concepts, seeds)."""
    return np.mean(a, axis=(-2, -1))


def mean_diff(a: np.ndarray, b: np.ndarray) -> float | np.ndarray:
    """Difference of means over the last two axes (concepts, seeds)."""
    return np.mean(a, axis=(-2, -1)) - np.mean(b, axis=(-2, -1))


def mean_ratio(a: np.ndarray, b: np.ndarray) -> float | np.ndarray:
    """Ratio of means over the last two axes (concepts, seeds)."""
    return np.mean(a, axis=(-2, -1)) / np.mean(b, axis=(-2, -1))
