"""Whole-tensor sums that come out the same however a tensor is sliced: sums of fixed blocks.

Σ x over a tensor is the float64 sum of the float32 sums of its 65,536-entry blocks, each block summed by
the backend (numpy's pairwise summation on the CPU). A method that meets the tensor one slice at a time
adds the same blocks in the same order, so a streamed norm or inner product has the same bits as the
whole-tensor one, and the rounding error stays at one block's. (Sequential float32 accumulation, as in
``torch.dot`` on the CPU, was measured 0.07–0.5 % off on a 16M-entry tensor.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gift_merge.engine.backend import Backend

REDUCE_BLOCK = 1 << 16
"""Entries per block of a whole-tensor sum."""


def blocks(count: int) -> Iterator[slice]:
    """The summation blocks of a flat tensor of ``count`` entries, in order."""
    for start in range(0, count, REDUCE_BLOCK):
        yield slice(start, min(start + REDUCE_BLOCK, count))


def blocked_total(backend: Backend, flat: Any) -> float:
    """Σ of a flat array, block by block (see the module docstring)."""
    total = 0.0
    for part in blocks(len(flat)):
        total += backend.total(flat[part])
    return total


def flat_dot(backend: Backend, a: Any, b: Any) -> float:
    """⟨a, b⟩ over all entries of two flat arrays: Σ of a·b block by block."""
    total = 0.0
    for part in blocks(len(a)):
        total += backend.total(a[part] * b[part])
    return total


def flat_norm(backend: Backend, a: Any) -> float:
    """‖a‖₂ over all entries of a flat array."""
    return math.sqrt(flat_dot(backend, a, a))
