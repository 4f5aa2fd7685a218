"""RAM and RAM+ (tensor-local): keep a change made by one model whole, average changes several models share.

    δ_i = θ_i − θ_b,   a_i = [|δ_i| > ε],   c = Σ_i a_i                     (per entry)
    ram:         θ = θ_b + Σ_i a_i · (δ_i if c = 1 else δ_i / c)
    ramplus_tl:  θ = θ_b + Σ_i a_i · (λ_i·δ_i if c = 1 else δ_i / c)
                 λ_i = 1 + r · clip(ρ_i, 0, α),   ρ_i = S_i / max(U_i, ε)
                 S_i = #{entries of this tensor with a_i and c > 1},   U_i = #{… with a_i and c = 1}

Reinforced Agent Merging, https://arxiv.org/abs/2601.13572

An entry is *unique* to model i when only i changes it by more than ε, and *shared* when several do; RAM
takes a unique change as it is instead of diluting it by the number of models, and averages shared ones
over the models that made them. RAM+ rescales each model's unique changes by λ_i, larger for a model
whose changes on this tensor are mostly shared (ρ_i is tensor-local, as in mergekit's ``ramplus_tl``).
Changes of at most ε count as no change and are dropped. ε, r and α are one value per tensor, mergekit's
``epsilon``, ``r`` and ``alpha``; as in mergekit, ε is also the floor of U_i in ρ_i.

The arithmetic is mergekit's in the compute dtype: ε is compared in that dtype, δ_i/c is a division, the
terms are added in model order, and λ_i is float32 (``1 + r·clip(ρ, 0, α)`` in float32 from the counts).
Deviations from mergekit 0.1.5:
- Negative ε, r or α are rejected (mergekit takes them: a negative ε marks every entry as changed, and an
  α < 0 makes λ_i = 1 + r·α whatever ρ_i).
- With ε = 0, a model equal to the base on a tensor has U_i = S_i = 0 and mergekit's λ_i = 0/0 = NaN,
  which its masked product turns into a NaN tensor; here λ_i only ever multiplies a unique change, so
  such a model just contributes nothing.
- mergekit returns the base when no other model is given; here a recipe needs at least one.

``ram`` is elementwise. ``ramplus_tl`` counts S_i and U_i in a first pass over the tensor and mixes in a
second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import MergeInputs, Operands, Operator, Param, elementwise
from .checks import interval

EPSILON = Param(
    "epsilon",
    1e-5,
    doc="Changes |θ_i − θ_b| at most this large count as no change.",
    check=interval("epsilon", 0.0, math.inf),
)
R = Param("r", 0.1, doc="Strength of the rescaling of a model's unique changes.", check=interval("r", 0.0, math.inf))
ALPHA = Param("alpha", 0.2, doc="Cap on the shared-to-unique ratio ρ.", check=interval("alpha", 0.0, math.inf))


def _activity(backend: Any, deltas: Sequence[Any], epsilon: float) -> tuple[list[Any], Any]:
    """Each model's [|δ_i| > ε] and their count c per entry (in the compute dtype)."""
    threshold = backend.scalar(epsilon, deltas[0])
    active = [backend.abs(delta) > threshold for delta in deltas]
    count = backend.astype(active[0], deltas[0].dtype)
    for mask in active[1:]:
        count += backend.astype(mask, count.dtype)
    return active, count


def ram_mix(backend: Any, base: Any, tensors: Sequence[Any], epsilon: float, scales: Sequence[float]) -> Any:
    """θ_b + Σ_i a_i·(λ_i·δ_i where c = 1, δ_i/c where c > 1), λ_i = ``scales[i]``, summed in model order."""
    deltas = [tensor - base for tensor in tensors]
    active, count = _activity(backend, deltas, epsilon)
    divisor = backend.maximum(count, 1.0)
    unique = count == 1
    merged: Any = None
    for delta, mask, scale in zip(deltas, active, scales, strict=True):
        term = delta / divisor  # δ_i/1 = δ_i exactly where c = 1
        if scale != 1.0:
            term = backend.where(unique, delta * scale, term)
        term *= backend.astype(mask, term.dtype)
        merged = term if merged is None else merged + term
    return base + merged


def ram_merge(inputs: MergeInputs[Any]) -> Any:
    if inputs.base is None:
        raise ValueError("ram needs a base tensor")
    ones = [1.0] * len(inputs.tensors)
    return ram_mix(inputs.backend, inputs.base, inputs.tensors, float(inputs.params["epsilon"]), ones)


def unique_scale(shared: int, unique: int, r: float, alpha: float, epsilon: float) -> float:
    """λ = 1 + r·clip(S/max(U, ε), 0, α) in float32, as mergekit computes it from the counts; 1 where the
    model has no unique entry (λ multiplies nothing then)."""
    f32 = np.float32
    if unique == 0:
        return 1.0
    rho = f32(shared) / max(f32(unique), f32(epsilon))
    return float(f32(1) + f32(r) * min(max(rho, f32(0)), f32(alpha)))


def ramplus_tl_merge(operands: Operands[Any]) -> None:
    base = operands.base
    if base is None:
        raise ValueError("ramplus_tl needs a base tensor")
    backend, params = operands.backend, operands.params
    epsilon = float(params["epsilon"])
    n = len(operands.sources)
    shared, unique = [0] * n, [0] * n
    for part in operands.row_chunks():  # first pass: each model's shared and unique entries
        b = base.read(part)
        active, count = _activity(backend, [source.read(part) - b for source in operands.sources], epsilon)
        is_shared, is_unique = count > 1, count == 1
        for i, mask in enumerate(active):
            shared[i] += backend.count(mask & is_shared)
            unique[i] += backend.count(mask & is_unique)
    r, alpha = float(params["r"]), float(params["alpha"])
    scales = [unique_scale(s, u, r, alpha, epsilon) for s, u in zip(shared, unique, strict=True)]
    for part in operands.row_chunks():  # second pass: the mix
        b = base.read(part)
        operands.out.write(
            part, ram_mix(backend, b, [source.read(part) for source in operands.sources], epsilon, scales)
        )


RAM = Operator(
    name="ram",
    merge=elementwise(ram_merge),
    params=(EPSILON,),
    base="required",
    min_models=1,
    summary="Keep changes only one model makes, average the changes several models share.",
    paper="https://arxiv.org/abs/2601.13572",
    elementwise=True,
)

RAMPLUS_TL = Operator(
    name="ramplus_tl",
    merge=ramplus_tl_merge,
    params=(EPSILON, R, ALPHA),
    base="required",
    min_models=1,
    summary="RAM with each model's unique changes scaled up by its shared-to-unique ratio on the tensor.",
    paper="https://arxiv.org/abs/2601.13572",
)
