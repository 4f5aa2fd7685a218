"""DARE: drop and rescale, then task arithmetic (dare_linear) or TIES consensus (dare_ties).

    m_i ~ Bernoulli(ρ_i) element-wise,   δ̃_i = m_i ⊙ δ_i · ‖δ_i‖₁/‖m_i ⊙ δ_i‖₁   (rescale: true, default)
    dare_linear:  θ = θ_b + λ · Σ_i w_i δ̃_i                       (÷ Σ_i w_i if normalize)
    dare_ties:    Δ_i = w_i δ̃_i,  σ = +1 where Σ_i Δ_i ≥ 0,  m'_i = [sign Δ_i = σ]
                  θ = θ_b + λ · Σ_i m'_i Δ_i                      (÷ Σ_i m'_i w_i if normalize)

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
https://arxiv.org/abs/2311.03099

The rescale is mergekit's exact per-tensor L1-norm match, not the paper's 1/ρ (equal in expectation);
it is skipped when either norm is below 1e-7. ``normalize`` defaults to false for both, as in mergekit.
Randomness: each model, in input order, draws one uniform tensor u of the delta's shape from the
generator (on the CPU), and keeps u < ρ_i. mergekit draws from torch's global RNG, so masks differ from
mergekit's for the same seed (same distribution).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gift_merge.lazy import torch

from . import gta_numpy
from .base import MergeInputs, Operator, StreamInputs
from .gta import gta_merge, gta_params, gta_stream, random_cut
from .kernels import masked, random_drop_mask

PAPER = "https://arxiv.org/abs/2311.03099"


def random_drop(
    delta: torch.Tensor, model_params: Mapping[str, Any], rescale: bool, generator: np.random.Generator | None
) -> torch.Tensor:
    """Keep each entry with probability ρ; the draw is consumed even at ρ = 1 (see kernels)."""
    density = float(model_params["density"])
    mask = random_drop_mask(delta, density, generator)
    if density >= 1:
        return delta
    return masked(delta, mask, rescale)


def dare_linear_merge(inputs: MergeInputs) -> torch.Tensor:
    return gta_merge(inputs, sparsify=random_drop, consensus=False)


def dare_linear_stream(stream: StreamInputs) -> torch.Tensor:
    return gta_stream(stream, random_cut, consensus=False)


def dare_ties_stream(stream: StreamInputs) -> torch.Tensor:
    return gta_stream(stream, random_cut, consensus=True)


def dare_ties_merge(inputs: MergeInputs) -> torch.Tensor:
    return gta_merge(inputs, sparsify=random_drop, consensus=True)


DARE_LINEAR = Operator(
    name="dare_linear",
    apply=dare_linear_merge,
    params=gta_params(normalize=False, rescale=True),
    base="required",
    random=True,
    summary="Randomly drop delta entries, rescale, then add the weighted task vectors.",
    paper=PAPER,
    stream=dare_linear_stream,
    numpy_stream=lambda stream: gta_numpy.gta_stream(stream, gta_numpy.random_cut, consensus=False),
)

DARE_TIES = Operator(
    name="dare_ties",
    apply=dare_ties_merge,
    params=gta_params(normalize=False, rescale=True),
    base="required",
    random=True,
    summary="Randomly drop delta entries, rescale, then TIES sign election and disjoint merge.",
    paper=PAPER,
    stream=dare_ties_stream,
    numpy_stream=lambda stream: gta_numpy.gta_stream(stream, gta_numpy.random_cut, consensus=True),
)
