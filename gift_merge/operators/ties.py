"""TIES merging: trim, elect sign, disjoint merge.

    δ̂_i = top-k(δ_i) by |δ_i|, k = ⌊ρ_i·N⌋     (optionally L1-rescaled to ‖δ_i‖₁: ``rescale``)
    Δ_i = w_i·δ̂_i,   σ = +1 where Σ_i Δ_i ≥ 0 else −1,   m_i = [sign Δ_i = σ]
    θ = θ_b + λ · Σ_i m_i Δ_i / Σ_i m_i w_i        (normalize: true, the default; 0 divisor → 1)
    θ = θ_b + λ · Σ_i m_i Δ_i                      (normalize: false)

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", https://arxiv.org/abs/2306.01708

As in mergekit the sign is elected on the *weighted* deltas (the paper uses unweighted ones), so a weight
changes the election and a negative weight flips a model's vote. Deviation: mergekit asserts k > 0 and
crashes when ⌊ρ·N⌋ = 0 (small density on a small tensor); here that model's trimmed delta is zero.
mergekit trims with a full argsort; this uses a selection with ties broken by index, same kept set up to
the order of exactly equal magnitudes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gift_merge.lazy import torch

from . import gta_numpy
from .base import MergeInputs, Operator, StreamInputs
from .gta import gta_merge, gta_params, gta_stream, magnitude_cut
from .kernels import magnitude_mask, masked


def magnitude_trim(
    delta: torch.Tensor, model_params: Mapping[str, Any], rescale: bool, generator: np.random.Generator | None
) -> torch.Tensor:
    """Keep the ⌊ρ·N⌋ largest-magnitude entries of δ; ρ ≥ 1 returns δ unchanged."""
    density = float(model_params["density"])
    if density >= 1:
        return delta
    return masked(delta, magnitude_mask(delta, density), rescale)


def ties_merge(inputs: MergeInputs) -> torch.Tensor:
    return gta_merge(inputs, sparsify=magnitude_trim, consensus=True)


def ties_stream(stream: StreamInputs) -> torch.Tensor:
    return gta_stream(stream, magnitude_cut, consensus=True)


TIES = Operator(
    name="ties",
    apply=ties_merge,
    params=gta_params(normalize=True, rescale=False),
    base="required",
    summary="Trim task vectors to their largest entries, elect a sign per entry, average the agreeing ones.",
    paper="https://arxiv.org/abs/2306.01708",
    stream=ties_stream,
    numpy_stream=lambda stream: gta_numpy.gta_stream(stream, gta_numpy.magnitude_cut, consensus=True),
)
