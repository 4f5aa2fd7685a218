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
from typing import Any

from .base import Operands, Operator, Param, Source
from .checks import interval
from .gta import Cut, MaskCut, gta_merge, gta_params, magnitudes
from .rescale import masked_l1_factor
from .selection import top_k

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
    """Keep the |δ| ranks [n_top, n_top + target) of the module docstring, decided on a |δ| buffer."""
    density = float(model_params["density"])
    if density >= 1:
        return None
    backend = operands.backend
    magnitude = magnitudes(operands, source)
    n = operands.numel
    target = int(density * n)
    n_top = min(int(float(model_params["gamma"]) * n), n - target)
    keep = top_k(backend, magnitude, n_top + target)
    keep &= ~top_k(backend, magnitude, n_top)
    return MaskCut(keep, masked_l1_factor(backend, magnitude, keep) if rescale else None)


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
)

BREADCRUMBS_TIES = Operator(
    name="breadcrumbs_ties",
    merge=breadcrumbs_ties_merge,
    params=gta_params(normalize=False, rescale=False, extra=(GAMMA,)),
    base="required",
    summary="Breadcrumbs pruning followed by TIES sign election and disjoint merge.",
    paper=PAPER,
)
