"""TIES merging: trim, elect sign, disjoint merge.

    δ̂_i = top-k(δ_i) by |δ_i|, k = ⌊ρ_i·N⌋     (optionally L1-rescaled to ‖δ_i‖₁: ``rescale``)
    Δ_i = w_i·δ̂_i,   σ = +1 where Σ_i Δ_i ≥ 0 else −1,   m_i = [sign Δ_i = σ]
    θ = θ_b + λ · Σ_i m_i Δ_i / Σ_i m_i w_i        (normalize: true, the default; 0 divisor → 1)
    θ = θ_b + λ · Σ_i m_i Δ_i                      (normalize: false)

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", https://arxiv.org/abs/2306.01708

As in mergekit the sign is elected on the *weighted* deltas (the paper uses unweighted ones), so a weight
changes the election and a negative weight flips a model's vote. Deviation: mergekit asserts k > 0 and
crashes when ⌊ρ·N⌋ = 0 (small density on a small tensor); here that model's trimmed delta is zero.
mergekit trims with a full argsort; this uses a selection with ties broken by index (:mod:`selection`),
the same kept set up to the order of exactly equal magnitudes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Operands, Operator, Source
from .gta import (
    Cut,
    ThresholdCut,
    empty_cut,
    gta_merge,
    gta_params,
    kept_l1_factor,
    magnitudes,
    streamed_threshold,
)
from .rescale import masked_l1_factor
from .selection import cut_mask


def magnitude_cut(
    operands: Operands[Any], source: Source[Any], model_params: Mapping[str, Any], rescale: bool
) -> Cut | None:
    """Keep the k = ⌊ρ·N⌋ entries of largest |δ| (none for k = 0, all for ρ ≥ 1), decided on a |δ| buffer."""
    density = float(model_params["density"])
    if density >= 1:
        return None
    k = int(density * operands.numel)
    if k <= 0:
        return empty_cut()
    backend = operands.backend
    if not operands.selects_on_buffer():  # a tensor too large for a |δ| buffer: radix passes, the same cut
        threshold, above = streamed_threshold(operands, source, k)
        cut = ThresholdCut(threshold, k - above, None)
        cut.factor = kept_l1_factor(operands, source, cut) if rescale else None
        return cut
    magnitude = magnitudes(operands, source)
    # Without a rescale nothing below needs |δ| in index order (the tie count is a count), so the selection
    # may reorder it in place and save the tensor-sized copy a partition would make.
    threshold, above = backend.kth_largest_and_count(magnitude, k, in_place=not rescale)
    factor = None
    if rescale:
        factor = masked_l1_factor(backend, magnitude, cut_mask(backend, magnitude, threshold, above, k))
    return ThresholdCut(threshold, k - above, factor)


def ties_merge(operands: Operands[Any]) -> None:
    gta_merge(operands, magnitude_cut, consensus=True)


TIES = Operator(
    name="ties",
    merge=ties_merge,
    params=gta_params(normalize=True, rescale=False),
    base="required",
    summary="Trim task vectors to their largest entries, elect a sign per entry, average the agreeing ones.",
    paper="https://arxiv.org/abs/2306.01708",
    memory="stream_cuts",
)
