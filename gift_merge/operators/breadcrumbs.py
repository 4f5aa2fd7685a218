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

import numpy as np

from gift_merge.lazy import torch

from . import gta_numpy
from .base import MergeInputs, Operator, Param, StreamInputs
from .checks import interval
from .gta import KeepMask, gta_merge, gta_params, gta_stream, l1_factor, magnitudes
from .kernels import breadcrumbs_mask, masked

PAPER = "https://arxiv.org/abs/2312.06795"

GAMMA = Param(
    "gamma",
    0.01,
    per_model=True,
    doc="Fraction of largest-magnitude delta entries removed as outliers.",
    check=interval("gamma", 0.0, 1.0, high_open=True),
)


def outlier_cut(
    stream: StreamInputs, tensor: torch.Tensor, model_params: Mapping[str, Any], rescale: bool
) -> KeepMask | None:
    """:func:`outlier_trim` for streaming: the same mask, built on the |δ| buffer."""
    density = float(model_params["density"])
    if density >= 1:
        return None
    magnitude = magnitudes(stream, tensor)
    keep = breadcrumbs_mask(magnitude.view(stream.shape), density, float(model_params["gamma"])).reshape(-1)
    return KeepMask(keep, l1_factor(magnitude, keep) if rescale else None)


def outlier_trim(
    delta: torch.Tensor, model_params: Mapping[str, Any], rescale: bool, generator: np.random.Generator | None
) -> torch.Tensor:
    density = float(model_params["density"])
    if density >= 1:
        return delta
    return masked(delta, breadcrumbs_mask(delta, density, float(model_params["gamma"])), rescale)


def breadcrumbs_merge(inputs: MergeInputs) -> torch.Tensor:
    return gta_merge(inputs, sparsify=outlier_trim, consensus=False)


def breadcrumbs_ties_merge(inputs: MergeInputs) -> torch.Tensor:
    return gta_merge(inputs, sparsify=outlier_trim, consensus=True)


BREADCRUMBS = Operator(
    name="breadcrumbs",
    apply=breadcrumbs_merge,
    params=gta_params(normalize=False, rescale=False, extra=(GAMMA,)),
    base="required",
    summary="Drop each task vector's outliers and small entries, then add the weighted task vectors.",
    paper=PAPER,
    stream=lambda stream: gta_stream(stream, outlier_cut, consensus=False),
    numpy_stream=lambda stream: gta_numpy.gta_stream(stream, gta_numpy.outlier_cut, consensus=False),
)

BREADCRUMBS_TIES = Operator(
    name="breadcrumbs_ties",
    apply=breadcrumbs_ties_merge,
    params=gta_params(normalize=False, rescale=False, extra=(GAMMA,)),
    base="required",
    summary="Breadcrumbs pruning followed by TIES sign election and disjoint merge.",
    paper=PAPER,
    stream=lambda stream: gta_stream(stream, outlier_cut, consensus=True),
    numpy_stream=lambda stream: gta_numpy.gta_stream(stream, gta_numpy.outlier_cut, consensus=True),
)
