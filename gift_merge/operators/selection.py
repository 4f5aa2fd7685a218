"""Magnitude selections with the documented tie order: the k largest entries, ties to the lower flat index.

A selection is a total order (value descending, then flat index ascending), so a mask never depends on
the device or on how a sort happens to break ties, and ``top_k(s, a) ⊆ top_k(s, b)`` for a ≤ b. The k-th
largest value comes from the backend's selection (never a full sort); the entries equal to it are kept in
index order until k are kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gift_merge.engine.backend import Backend


def cut_mask(backend: Backend, flat: Any, threshold: Any, above: int, k: int) -> Any:
    """The entries above ``threshold`` plus, in index order, the first ``k − above`` equal to it."""
    mask = flat > threshold
    if above != k:  # ties cross the cut (common in bf16 checkpoints, whose deltas repeat values)
        mask[backend.flatnonzero(flat == threshold)[: k - above]] = True
    return mask


def top_k(backend: Backend, scores: Any, k: int) -> Any:
    """Mask of the ``k`` largest entries of a flat array (all false for k ≤ 0, all true for k ≥ n)."""
    if k <= 0:
        return full(backend, len(scores), False)
    if k >= len(scores):
        return full(backend, len(scores), True)
    threshold, above = backend.kth_largest_and_count(scores, k)
    return cut_mask(backend, scores, threshold, above, k)


def full(backend: Backend, count: int, value: bool) -> Any:
    """A flat mask of ``count`` entries, all ``value``."""
    mask = backend.empty(count, "bool")
    mask[:] = value
    return mask
