"""Model Breadcrumbs: drop both the largest outliers and the smallest entries of each task vector.

    n_top = ⌊γ_i·N⌋, target = ⌊ρ_i·N⌋; if n_top + target > N then n_top = N − target
    δ̂_i keeps the entries of |δ_i| rank (0 = largest) in [n_top, n_top + target)
                                                   (optionally L1-rescaled to ‖δ_i‖₁: ``rescale``)
    breadcrumbs:       θ = θ_b + λ · Σ_i w_i δ̂_i                     (÷ Σ_i w_i if normalize)
    breadcrumbs_ties:  Δ_i = w_i δ̂_i, σ = +1 where Σ_i Δ_i ≥ 0, m_i = [sign Δ_i = σ]
                       θ = θ_b + λ · Σ_i m_i Δ_i                      (÷ Σ_i m_i w_i if normalize)

Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
https://arxiv.org/abs/2312.06795

Deviation: mergekit keeps ``sorted_indices[n_bot:-n_top]``, which is empty when n_top = 0 (γ = 0, or any
tensor with fewer than 1/γ elements, e.g. a 64-element bias at the default γ = 0.01), so it silently
zeroes that model's delta. Here n_top = 0 keeps the ⌊ρN⌋ largest entries, the mathematically intended
set. ρ ≥ 1 returns δ unchanged (no outlier removal), as in mergekit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .base import Operands, Operator, Param, Source
from .checks import interval
from .gta import (
    Cut,
    MagnitudeCut,
    MaskCut,
    ThresholdCut,
    empty_cut,
    gta_merge,
    gta_params,
    kept_l1_factor,
    magnitudes,
    streamed_threshold,
)
from .rescale import masked_l1_factor

if TYPE_CHECKING:
    from gift_merge.engine.backend import Backend
from .selection import full, top_k

PAPER = "https://arxiv.org/abs/2312.06795"

GAMMA = Param(
    "gamma",
    0.01,
    per_model=True,
    doc="Fraction of largest-magnitude delta entries removed as outliers.",
    check=interval("gamma", 0.0, 1.0, high_open=True),
)


def outlier_cut(
    operands: Operands[Any], source: Source[Any], model_params: Mapping[str, Any], rescale: bool
) -> Cut | None:
    """Keep the |δ| ranks [n_top, n_top + target) of the module docstring: decided on a |δ| buffer, or for a
    tensor too large for one, by two streamed thresholds (:class:`BandCut`), the same entries either way."""
    density = float(model_params["density"])
    if density >= 1:
        return None
    backend = operands.backend
    n = operands.numel
    target = int(density * n)
    n_top = min(int(float(model_params["gamma"]) * n), n - target)
    if not operands.selects_on_buffer():
        band = BandCut(_top(operands, source, n_top + target), _top(operands, source, n_top), None)
        band.factor = kept_l1_factor(operands, source, band) if rescale else None
        return band
    magnitude = magnitudes(operands, source)
    keep = top_k(backend, magnitude, n_top + target)
    keep &= ~top_k(backend, magnitude, n_top)
    return MaskCut(keep, masked_l1_factor(backend, magnitude, keep) if rescale else None)


def _top(operands: Operands[Any], source: Source[Any], k: int) -> ThresholdCut | None:
    """The cut keeping the k largest |δ| (as :func:`~.selection.top_k`), or None for all of them."""
    if k >= operands.numel:
        return None
    if k <= 0:
        return empty_cut()
    value, above = streamed_threshold(operands, source, k)
    return ThresholdCut(value, k - above, None)


@dataclass
class BandCut(MagnitudeCut):
    """The |δ| ranks between two streamed cuts: kept by ``lower`` and not by ``upper`` (None: every entry)."""

    lower: ThresholdCut | None
    upper: ThresholdCut | None
    factor: float | None

    def keep(self, backend: Backend, magnitude: Any) -> Any:
        """The next slice's mask, in index order (each bound takes its ties in order)."""
        keep = self.lower.keep(backend, magnitude) if self.lower is not None else full(backend, len(magnitude), True)
        if self.upper is not None:
            keep &= ~self.upper.keep(backend, magnitude)
        return keep


def breadcrumbs_merge(operands: Operands[Any]) -> None:
    gta_merge(operands, outlier_cut, consensus=False)


def breadcrumbs_ties_merge(operands: Operands[Any]) -> None:
    gta_merge(operands, outlier_cut, consensus=True)


BREADCRUMBS = Operator(
    name="breadcrumbs",
    merge=breadcrumbs_merge,
    params=gta_params(normalize=False, rescale=False, extra=(GAMMA,)),
    base="required",
    summary="Drop each task vector's outliers and small entries, then add the weighted task vectors.",
    paper=PAPER,
    memory="stream_cuts",
)

BREADCRUMBS_TIES = Operator(
    name="breadcrumbs_ties",
    merge=breadcrumbs_ties_merge,
    params=gta_params(normalize=False, rescale=False, extra=(GAMMA,)),
    base="required",
    summary="Breadcrumbs pruning followed by TIES sign election and disjoint merge.",
    paper=PAPER,
    memory="stream_cuts",
)
