"""The kernels of the streamed CPU path, in numpy: twins of :mod:`kernels` that give the same bits.

The sparsifying methods stream large tensors on the CPU in numpy (:mod:`gta_numpy`), and their torch
path (:mod:`gta`, :mod:`kernels`) is the reference they must equal. Every function here repeats its
torch twin's operations, roundings and summation blocks; what both need in numpy anyway (selection,
random bits, block sums) lives once, in :mod:`kernels`. tests/test_numpy_path.py holds the two paths
to the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import kernels
from .kernels import kth_largest_and_count, l1_factor


def cut_mask(flat: np.ndarray, threshold: np.floating, above: int, k: int) -> np.ndarray:
    """:func:`kernels.cut_mask`: the entries above ``threshold`` plus the first ``k − above`` equal to it."""
    mask = flat > threshold
    if above != k:
        mask[np.flatnonzero(flat == threshold)[: k - above]] = True
    return mask


def topk_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """:func:`kernels.topk_mask` of a flat array."""
    if k <= 0:
        return np.zeros(scores.shape, dtype=bool)
    if k >= scores.size:
        return np.ones(scores.shape, dtype=bool)
    threshold, above = kth_largest_and_count(scores, k)
    return cut_mask(scores, threshold, above, k)


def breadcrumbs_mask(magnitude: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """:func:`kernels.breadcrumbs_mask` on a flat |δ|."""
    n = magnitude.size
    target = int(density * n)
    n_top = min(int(gamma * n), n - target)
    keep = topk_mask(magnitude, n_top + target)
    keep &= ~topk_mask(magnitude, n_top)
    return keep


def kept_l1_factor(magnitude: np.ndarray, keep: np.ndarray) -> float | None:
    """:func:`gta.l1_factor`: ‖|δ|‖₁ / ‖keep·|δ|‖₁ by blocked sums; masks ``magnitude`` in place."""
    before = kernels.blocked_sum(magnitude)
    magnitude *= keep
    return l1_factor(before, kernels.blocked_sum(magnitude))


def consensus_sum(weighted: Sequence[np.ndarray], weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`kernels.consensus_sum`: (Σ agreeing Δ_i, Σ agreeing w_i with 0 → 1); consumes ``weighted``."""
    total = weighted[0] + weighted[1] if len(weighted) > 1 else weighted[0].copy()
    for d in weighted[2:]:
        total += d
    sigma = np.copysign(np.float32(1), total)
    mixed = divisor = None
    for d, w in zip(weighted, weights, strict=True):
        agree = np.greater(d * sigma, 0)
        if mixed is None or divisor is None:
            d *= agree
            mixed = d
            divisor = agree * np.float32(w)
        else:
            mixed += d * agree
            divisor += agree * np.float32(w)
    assert mixed is not None and divisor is not None
    divisor += divisor == 0
    return mixed, divisor
