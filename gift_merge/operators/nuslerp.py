"""NuSLERP: spherical interpolation of two models with weights, optionally of their task vectors.

    t = w_2/(w_1 + w_2)             (t = ½ when |w_1 + w_2| < 1e-6, as in mergekit)
    with a base:     θ = θ_b + slerp_t(θ_1 − θ_b, θ_2 − θ_b)
    without a base:  θ = slerp_t(θ_1, θ_2)
    slerp_t(a, b) = (sin((1 − t)Ω)·a + sin(tΩ)·b)/sin Ω,   Ω = arccos⟨a/‖a‖, b/‖b‖⟩
                    (norms clamped at 1e-7; where |sin Ω| < 1e-8: (1 − t)·a + t·b)

``nuslerp_flatten`` (default true) treats the tensor as one vector. With it false the interpolation is
done per vector: ``nuslerp_row_wise: false`` (default) takes vectors along the last dimension (each row
W[i, :] of an [out, in] matrix), ``true`` along dim 0 (each column W[:, j]). This is what mergekit's code
does; its docs describe the two the other way round.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985,
https://doi.org/10.1145/325165.325242 (mergekit names no paper for nuslerp).
The per-vector angle is computed in float64, so exactly antiparallel vectors take the lerp branch instead
of dividing by the float32 rounding residue of sin π. The tensor is read whole (a vector's angle needs
the whole vector, and with ``nuslerp_row_wise`` a vector is a column).
"""

from __future__ import annotations

from typing import Any

from .base import Operands, Operator, Param
from .checks import WEIGHT


def slerp_rows(operands: Operands[Any], t: float, v0: Any, v1: Any, eps: float = 1e-8) -> Any:
    """``slerp_t`` of the module docstring for each row (last dimension) of ``v0`` and ``v1``."""
    backend = operands.backend
    n0 = backend.maximum(backend.sqrt(backend.row_sums(v0 * v0)), 1e-7)
    n1 = backend.maximum(backend.sqrt(backend.row_sums(v1 * v1)), 1e-7)
    cos = backend.clip(backend.astype(backend.row_sums(v0 * v1) / (n0 * n1), "float64"), -1, 1)
    theta = backend.acos(cos)
    sin_theta = backend.sin(theta)
    colinear = backend.abs(sin_theta) < eps
    safe_sin = backend.where(colinear, 1.0, sin_theta)
    c0 = backend.astype(backend.where(colinear, 1 - t, backend.sin((1 - t) * theta) / safe_sin), v0.dtype)
    c1 = backend.astype(backend.where(colinear, t, backend.sin(t * theta) / safe_sin), v0.dtype)
    return c0 * v0 + c1 * v1


def nuslerp_merge(operands: Operands[Any]) -> None:
    w1, w2 = (float(mp["weight"]) for mp in operands.model_params)
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    whole, shape, backend = slice(0, operands.numel), operands.shape, operands.backend
    a, b = (source.read(whole) for source in operands.sources)
    base = operands.base.read(whole) if operands.base is not None else None
    if base is not None:
        a, b = a - base, b - base
    if operands.params["nuslerp_flatten"] or len(shape) < 2:  # a vector has only one direction to take
        out = slerp_rows(operands, t, a.reshape(1, -1), b.reshape(1, -1)).reshape(-1)
    elif operands.params["nuslerp_row_wise"]:
        columns = [backend.moveaxis(x.reshape(shape), 0, -1) for x in (a, b)]
        out = backend.moveaxis(slerp_rows(operands, t, *columns), -1, 0).reshape(-1)
    else:
        out = slerp_rows(operands, t, a.reshape(-1, shape[-1]), b.reshape(-1, shape[-1])).reshape(-1)
    operands.out.write(whole, out if base is None else base + out)


NUSLERP = Operator(
    name="nuslerp",
    merge=nuslerp_merge,
    params=(
        WEIGHT,
        Param("nuslerp_flatten", True, kind=bool, doc="Interpolate the whole tensor as one vector."),
        Param(
            "nuslerp_row_wise",
            False,
            kind=bool,
            doc="Without flatten: interpolate vectors along dim 0 instead of the last dimension.",
        ),
    ),
    base="optional",
    min_models=2,
    max_models=2,
    summary="Weighted spherical interpolation of two models, or of their task vectors over a base.",
    paper="https://doi.org/10.1145/325165.325242",
    memory="whole",
)
