"""DELLA: magnitude-ranked random drop (MagPrune) and rescale, then TIES consensus or a plain sum.

    per row of δ_i (slices along the last dimension; a vector is one row), rank |δ| ascending: r = 0..n−1,
    r̃ = r/(n − 1),  p = (ρ_i − ε_i) + 2ε_i·r̃,  m_i ~ Bernoulli(p)
    δ̃_i = m_i ⊙ δ_i · ‖δ_i‖₁/‖m_i ⊙ δ_i‖₁          (rescale: true, the default for both)
    della:         Δ_i = w_i δ̃_i, σ = +1 where Σ_i Δ_i ≥ 0, m'_i = [sign Δ_i = σ]
                   θ = θ_b + λ · Σ_i m'_i Δ_i / Σ_i m'_i w_i   (normalize: true, the default)
    della_linear:  θ = θ_b + λ · Σ_i w_i δ̃_i                  (normalize: false, the default)

Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling",
https://arxiv.org/abs/2406.11617

Like mergekit, the rescale is the per-tensor L1-norm match (the paper rescales each kept entry by 1/p).
Randomness: each model, in input order, draws one uniform tensor u of the delta's shape (on the CPU) and
keeps u < p. Differences from mergekit, each deliberate:
- Range rule: mergekit raises unless 0 < ρ − ε and ρ + ε < 1 (strict) for ρ < 1. The keep probabilities
  only need to lie in [0, 1], so here 0 ≤ ρ − ε and ρ + ε ≤ 1 is accepted (ρ = 1 keeps δ unchanged
  whatever ε, as in mergekit). The check runs before any tensor is read.
- A one-element row has no rank spread (mergekit computes 0/0 and fails); here r̃ = ½, so p = ρ.
- Equal magnitudes are ranked by index (stable sort), not in argsort's unspecified order.
- Rows are slices along the last dimension. mergekit ranks along dim 1, which is the same for the
  1-D and 2-D tensors of language models and differs only for tensors of three or more dimensions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gift_merge.lazy import torch

from .base import MergeInputs, Operator, Param, StreamInputs
from .checks import interval
from .gta import KeepMask, gta_merge, gta_params, gta_stream, l1_factor, magnitudes
from .kernels import della_keep_mask, masked, skip_draws

PAPER = "https://arxiv.org/abs/2406.11617"

EPSILON = Param(
    "epsilon",
    0.15,
    per_model=True,
    doc="Half-width of the keep-probability range around density, from smallest to largest |δ| in a row.",
    check=interval("epsilon", 0.0, float("inf")),
)


def magprune_cut(
    stream: StreamInputs, tensor: torch.Tensor, model_params: Mapping[str, Any], rescale: bool
) -> KeepMask | None:
    """:func:`magprune` for streaming: the same draws and mask, built on the |δ| buffer."""
    density = float(model_params["density"])
    if density >= 1:
        skip_draws(stream.generator, stream.base.numel())  # as magprune does
        return None
    magnitude = magnitudes(stream, tensor)
    keep = della_keep_mask(magnitude.view(stream.shape), density, float(model_params["epsilon"]), stream.generator)
    keep = keep.reshape(-1)
    return KeepMask(keep, l1_factor(magnitude, keep) if rescale else None)


def magprune(
    delta: torch.Tensor, model_params: Mapping[str, Any], rescale: bool, generator: np.random.Generator | None
) -> torch.Tensor:
    """Drop entries with probability 1 − p, p rising linearly with the entry's |δ| rank in its row."""
    density = float(model_params["density"])
    if density >= 1:
        skip_draws(generator, delta.numel())
        return delta
    keep = della_keep_mask(delta, density, float(model_params["epsilon"]), generator)
    return masked(delta, keep, rescale)


def check_della(params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]) -> str | None:
    """Keep probabilities ρ ± ε must be probabilities for every model that is pruned (ρ < 1)."""
    for index, mp in enumerate(model_params):
        density, epsilon = float(mp["density"]), float(mp["epsilon"])
        if density < 1 and (density - epsilon < -1e-9 or density + epsilon > 1 + 1e-9):
            return (
                "density - epsilon must be ≥ 0 and density + epsilon ≤ 1 (they bound the keep probability), "
                f"got density {density} and epsilon {epsilon} for models[{index}]"
            )
    return None


def della_merge(inputs: MergeInputs) -> torch.Tensor:
    return gta_merge(inputs, sparsify=magprune, consensus=True)


def della_linear_merge(inputs: MergeInputs) -> torch.Tensor:
    return gta_merge(inputs, sparsify=magprune, consensus=False)


DELLA = Operator(
    name="della",
    apply=della_merge,
    params=gta_params(normalize=True, rescale=True, extra=(EPSILON,)),
    base="required",
    random=True,
    summary="Drop delta entries with magnitude-ranked probabilities, rescale, then TIES consensus.",
    paper=PAPER,
    check=check_della,
    stream=lambda stream: gta_stream(stream, magprune_cut, consensus=True),
)

DELLA_LINEAR = Operator(
    name="della_linear",
    apply=della_linear_merge,
    params=gta_params(normalize=False, rescale=True, extra=(EPSILON,)),
    base="required",
    random=True,
    summary="Drop delta entries with magnitude-ranked probabilities, rescale, then add the weighted deltas.",
    paper=PAPER,
    check=check_della,
    stream=lambda stream: gta_stream(stream, magprune_cut, consensus=False),
)
