"""Generalized task arithmetic (GTA): the pipeline behind task_arithmetic, ties, dare, breadcrumbs and della.

For task vectors δ_i = θ_i − θ_b, a sparsifier s (with its own ρ_i, γ_i or ε_i per model) and weights w_i:

    Δ_i = w_i · s(δ_i)
    without consensus:  mixed = Σ_i Δ_i,        divisor = Σ_i w_i        (|divisor| < 1e-8 → 1)
    with consensus:     σ = sign⁺(Σ_i Δ_i),  m_i = [sign Δ_i = σ],
                        mixed = Σ_i m_i Δ_i,    divisor = Σ_i m_i w_i    (0 → 1)
    θ = θ_b + λ · (mixed / divisor if normalize else mixed)

This is mergekit's ``GeneralizedTaskArithmeticMerge`` (sign election on the *weighted* deltas, σ = +1
where the sum is ≥ 0). Each variant differs only in its sparsifier, whether it elects signs, and the
defaults of ``normalize`` and ``rescale`` (L1-norm-match rescale after pruning, applied to whichever
sparsifier the variant uses). Task arithmetic: https://arxiv.org/abs/2212.04089
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .base import MergeInputs, Param
from .checks import DENSITY, INT8_MASK, WEIGHT, finite
from .kernels import consensus_sum, task_vectors

Sparsifier = Callable[[torch.Tensor, Mapping[str, Any], bool, torch.Generator | None], torch.Tensor]
"""(δ_i, model i's params, rescale, generator) → pruned δ_i. Called once per model, in input order."""

CHUNK = 1 << 18  # entries per chunk of the elementwise stage: 1 MB of fp32, cache-resident

LAMBDA = Param("lambda", 1.0, doc="Scale of the merged delta.", check=finite("lambda"))


def gta_params(*, normalize: bool, rescale: bool, extra: tuple[Param, ...] = ()) -> tuple[Param, ...]:
    """The parameters every GTA variant declares, with that variant's defaults."""
    return (
        WEIGHT,
        DENSITY,
        *extra,
        LAMBDA,
        Param("normalize", normalize, kind=bool, doc="Divide the mixed delta by the (agreeing) weight sum."),
        Param("rescale", rescale, kind=bool, doc="After pruning, rescale each delta to its original L1 norm."),
        INT8_MASK,
    )


def gta_merge(inputs: MergeInputs, sparsify: Sparsifier | None, consensus: bool) -> torch.Tensor:
    """θ_b + λ·mix(w_i·s(δ_i)) as in the module docstring."""
    base = inputs.base
    if base is None:
        raise ValueError("generalized task arithmetic needs a base tensor")
    params = inputs.params
    rescale = bool(params["rescale"])
    weights = [float(mp["weight"]) for mp in inputs.model_params]
    # Sparsifiers rank or rescale over the whole tensor, so they get whole task vectors; without one the
    # task vectors are formed chunk by chunk below and never exist whole.
    deltas: list[torch.Tensor] | None = None
    if sparsify is not None:
        deltas = [
            sparsify(d, mp, rescale, inputs.generator)
            for d, mp in zip(task_vectors(inputs.tensors, base), inputs.model_params, strict=True)
        ]
    normalize, lam = bool(params["normalize"]), float(params["lambda"])
    total = sum(weights)
    flat_base = base.reshape(-1)
    flat_inputs = [t.reshape(-1) for t in (deltas if deltas is not None else inputs.tensors)]
    out = torch.empty_like(flat_base)
    # Everything after sparsification is elementwise: run it on cache-sized chunks, which keeps the
    # temporaries (weighted deltas, sign sums, divisors) small and in cache. Same arithmetic per element.
    for start in range(0, flat_base.numel(), CHUNK):
        part = slice(start, start + CHUNK)
        if deltas is None:
            weighted = [(t[part] - flat_base[part]).mul_(w) for t, w in zip(flat_inputs, weights, strict=True)]
        else:
            weighted = [t[part] * w for t, w in zip(flat_inputs, weights, strict=True)]
        divisor: torch.Tensor | float
        if consensus:
            mixed, divisor = consensus_sum(weighted, weights)
        else:
            mixed = weighted[0]
            for d in weighted[1:]:
                mixed.add_(d)
            divisor = total if abs(total) >= 1e-8 else 1.0
        if normalize:
            mixed.div_(divisor)
        torch.add(flat_base[part], mixed.mul_(lam), out=out[part])
    return out.view(base.shape)
