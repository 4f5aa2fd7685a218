"""The L1-norm-match rescale of pruning methods (mergekit's ``RescaleNorm.l1``).

    δ̃ = m ⊙ δ · ‖δ‖₁ / ‖m ⊙ δ‖₁        (skipped when either norm is below 1e-7, where the ratio is noise)

An exact per-tensor norm match, not the papers' 1/ρ (equal only in expectation). Both norms are blocked
sums (:mod:`reductions`), so a streamed pass gets the same factor as a whole-tensor one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .reductions import blocked_total, blocks

if TYPE_CHECKING:
    from gift_merge.engine.backend import Backend

    from .base import Operands, Source

RESCALE_EPS = 1e-7


def l1_factor(before: float, after: float) -> float | None:
    """‖δ‖₁/‖kept‖₁, or ``None`` (no rescale) when either norm is below :data:`RESCALE_EPS`."""
    return before / after if before >= RESCALE_EPS and after >= RESCALE_EPS else None


def masked_l1_factor(backend: Backend, magnitude: Any, keep: Any) -> float | None:
    """The factor for a flat |δ| buffer and its keep mask; masks ``magnitude`` in place (callers are done
    with it, and a product into a new buffer would cost a tensor-sized copy)."""
    before = blocked_total(backend, magnitude)
    magnitude *= keep
    return l1_factor(before, blocked_total(backend, magnitude))


def streamed_l1_factor(operands: Operands[Any], source: Source[Any], keep: Callable[[slice, Any], Any]) -> float | None:
    """The factor without a |δ| buffer: |δ| formed a summation block at a time from ``source`` and the base
    (the blocks :func:`masked_l1_factor` sums, so the same factor); ``keep(part, magnitude)`` gives the
    block's mask (blocks come in order)."""
    assert operands.base is not None
    backend = operands.backend
    before = after = 0.0
    for part in blocks(operands.numel):
        magnitude = backend.abs(source.read(part) - operands.base.read(part))
        before += backend.total(magnitude)
        magnitude *= keep(part, magnitude)
        after += backend.total(magnitude)
    return l1_factor(before, after)


def by_slice(mask_of: Callable[[slice], Any]) -> Callable[[slice, Any], Any]:
    """A mask given by slice (a buffer's ``__getitem__``, a replayed mask), as :func:`streamed_l1_factor`
    takes it."""
    return lambda part, magnitude: mask_of(part)
