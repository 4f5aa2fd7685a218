"""The L1-norm-match rescale of pruning methods (mergekit's ``RescaleNorm.l1``).

    δ̃ = m ⊙ δ · ‖δ‖₁ / ‖m ⊙ δ‖₁        (skipped when either norm is below 1e-7, where the ratio is noise)

An exact per-tensor norm match, not the papers' 1/ρ (equal only in expectation). Both norms are blocked
sums (:mod:`reductions`), so a streamed pass gets the same factor as a whole-tensor one.
"""

from __future__ import annotations

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


def streamed_l1_factor(operands: Operands[Any], source: Source[Any], keep: Any) -> float | None:
    """The factor without a |δ| buffer: |δ| formed block by block from ``source`` and the base; ``keep`` is
    a flat mask, or a function of a slice that gives the mask's slice (slices come in order)."""
    assert operands.base is not None
    backend = operands.backend
    mask_of = keep if callable(keep) else keep.__getitem__
    before = after = 0.0
    for part in blocks(operands.numel):
        magnitude = backend.abs(source.read(part) - operands.base.read(part))
        before += backend.total(magnitude)
        magnitude *= mask_of(part)
        after += backend.total(magnitude)
    return l1_factor(before, after)
