"""SLERP: spherical linear interpolation between the base and one other model, per tensor.

The tensor is one flattened vector. With u = v/‖v‖ (a norm ≤ 1e-8 left unnormalised) and d = ⟨u_b, u_1⟩:

    |d| > 0.9995:   θ = (1 − t)·θ_b + t·θ_1                                  (near-parallel: lerp)
    otherwise:      Ω = arccos d,  θ = sin((1 − t)Ω)/sin Ω · θ_b + sin(tΩ)/sin Ω · θ_1

t = 0 gives the base, t = 1 the other model. Shoemake, "Animating rotation with quaternion curves",
SIGGRAPH 1985, https://doi.org/10.1145/325165.325242 (no arXiv paper; mergekit cites the same formula).

mergekit computes in numpy float32 on the CPU; here the vectors stay in the compute dtype on their device
and only the angle is computed in float64, a difference of float32 rounding. mergekit also accepts t
outside [0, 1] (extrapolation along the arc); here that is rejected as a likely recipe mistake.
"""

from __future__ import annotations

import math
from typing import Any

from .base import Operands, Operator, Param
from .checks import interval
from .reductions import blocks


def slerp_coefficients(
    t: float, norm0_sq: float, norm1_sq: float, dot: float, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> tuple[float, float]:
    """(s0, s1) with θ = s0·θ_b + s1·θ_1, from ‖θ_b‖², ‖θ_1‖² and ⟨θ_b, θ_1⟩ (the module docstring's
    formula, in float64)."""
    n0, n1 = math.sqrt(norm0_sq), math.sqrt(norm1_sq)
    cos = dot / ((n0 if n0 > eps else 1.0) * (n1 if n1 > eps else 1.0))
    if abs(cos) > dot_threshold:
        return 1 - t, t
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return math.sin((1 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def slerp_merge(operands: Operands[Any]) -> None:
    """Two passes: the norms and the inner product over the summation blocks, then the interpolation."""
    base, other = operands.base, operands.sources[0]
    if base is None:
        raise ValueError("slerp needs a base tensor")
    backend = operands.backend
    norm0_sq = norm1_sq = dot = 0.0
    for part in blocks(operands.numel):
        v0, v1 = base.read(part), other.read(part)
        norm0_sq += backend.total(v0 * v0)
        norm1_sq += backend.total(v1 * v1)
        dot += backend.total(v0 * v1)
    s0, s1 = slerp_coefficients(float(operands.params["t"]), norm0_sq, norm1_sq, dot)
    for part in operands.chunks():
        mixed = base.read(part) * s0
        mixed += other.read(part) * s1
        operands.out.write(part, mixed)


SLERP = Operator(
    name="slerp",
    merge=slerp_merge,
    params=(Param("t", doc="Interpolation factor: 0 is the base, 1 the other model.", check=interval("t", 0.0, 1.0)),),
    base="required",
    min_models=1,
    max_models=1,
    summary="Spherical interpolation between the base and one other model.",
    paper="https://doi.org/10.1145/325165.325242",
)
