"""The k-th largest entry of a flat array, exactly, on the host: the one selection every magnitude cut uses.

numpy on the CPU; a GPU backend has its own (``torch.kthvalue``). The tie order of a cut (equal values
kept in index order) is the methods' business (:mod:`gift_merge.operators.selection`); this only finds
the value and how many entries exceed it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

_SAMPLE = 1 << 16
"""Entries of the strided sample that guesses the k-th largest value."""
_GUESS_FROM = 1 << 20
"""Below this size introselect is fast enough."""


def kth_largest_and_count(values: np.ndarray, k: int, *, in_place: bool = False) -> tuple[Any, int]:
    """The k-th largest entry v of a 1-D array (1 ≤ k ≤ n) and how many entries exceed it.

    Why not just ``np.partition``: task vectors of bf16 checkpoints repeat few values (a 4.5M-entry |δ| had
    7,066 distinct ones), which makes introselect crawl (~8 ns per entry), while a guess from a strided
    sample usually *is* the answer and two counting passes (~1 ns per entry) prove it. When the guess
    misses, only the entries between it and a second sample value are selected among; when the sample
    cannot bracket the answer (or there are NaNs, which order differently), it falls back to introselect.
    The count comes free from the counting passes; TIES needs it to resolve ties at the cut.
    """
    n = values.size
    if n >= _GUESS_FROM:
        found = _sampled_kth_largest(values, k)
        if found is not None:
            return found
    if in_place:
        values.partition(n - k)
        value = values[n - k]
    else:
        value = np.partition(values, n - k)[n - k]
    return value, int(np.count_nonzero(values > value))


def _sampled_kth_largest(values: np.ndarray, k: int) -> tuple[Any, int] | None:
    n = values.size
    if not math.isfinite(float(values.sum())):  # NaNs: introselect ranks them above everything
        return None
    sample = np.sort(values[:: max(1, n // _SAMPLE)])
    m = sample.size
    margin = 4 * int(math.sqrt(m)) + 8
    at = min(max(int(m - k * m / n), 0), m - 1)
    guess = sample[at]
    above = int(np.count_nonzero(values > guess))  # the answer v satisfies count(> v) < k ≤ count(≥ v)
    if above < k:
        equal = int(np.count_nonzero(values == guess))
        if above + equal >= k:
            return guess, above
        # the answer is below the guess: select among [lower, guess)
        between = values < guess
        if at - margin > 0:
            between &= values >= sample[at - margin]
        candidates = values[between]
        above_candidates = above + equal
    else:
        # the answer is above the guess: select among (guess, upper]
        if at + margin < m - 1:
            upper = sample[at + margin]
            above_candidates = int(np.count_nonzero(values > upper))
            if above_candidates >= k:
                return None
            candidates = values[(values > guess) & (values <= upper)]
        else:
            above_candidates = 0
            candidates = values[values > guess]
    need = k - above_candidates
    if need > candidates.size:
        return None
    candidates.partition(candidates.size - need)
    value = candidates[candidates.size - need]
    return value, above_candidates + int(np.count_nonzero(candidates > value))


HISTOGRAM_BINS = 1 << 16
"""Bins of one radix pass: 16 of a float32's 32 bits."""
_INF_BITS = 0x7F800000


def streamed_kth_largest(histogram: Callable[[int | None], np.ndarray], k: int) -> tuple[float, int]:
    """What :func:`kth_largest_and_count` answers for non-negative float32 values that exist only a block at
    a time (no tensor-sized buffer): the k-th largest value and how many values exceed it.

    Non-negative float32 values order like their bit patterns, so two radix passes find the k-th largest
    exactly: ``histogram(None)`` counts the values' high 16 bits, which fixes the high half of the answer,
    and ``histogram(high)`` counts the low 16 bits of the values in that bin. NaN bit patterns lie above
    +inf's, as NaN ranks above everything in a partition; as there, a NaN answer counts 0 above it, and
    NaNs are never counted above a number (every comparison with NaN is false). A third pass runs only when
    the values hold inf or NaN outside the answer's bin (the NaNs in +inf's bin must be counted).
    """
    high = histogram(None)
    top, above_top = _bin_of_kth(high, k)
    low = histogram(top)
    bottom, above_bottom = _bin_of_kth(low, k - above_top)
    bits = top << 16 | bottom
    if bits > _INF_BITS:
        return math.nan, 0
    inf_bin = _INF_BITS >> 16
    nans = int(high[inf_bin + 1 :].sum())
    if top == inf_bin:
        nans += int(low[1:].sum())
    elif high[inf_bin]:
        nans += int(histogram(inf_bin)[1:].sum())
    value = float(np.array(bits, dtype=np.uint32).view(np.float32))
    return value, above_top + above_bottom - nans


def _bin_of_kth(counts: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest of the counted values, and how many values lie in higher bins."""
    from_top = np.cumsum(counts[::-1])
    index = int(np.searchsorted(from_top, k))  # the first index whose running count reaches k
    return len(counts) - 1 - index, int(from_top[index - 1]) if index else 0
