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
of dividing by the float32 rounding residue of sin π.
"""

from __future__ import annotations

from gift_merge.lazy import torch

from .base import MergeInputs, Operator, Param
from .checks import WEIGHT
from .kernels import slerp_rows


def nuslerp_merge(inputs: MergeInputs) -> torch.Tensor:
    w1, w2 = (float(mp["weight"]) for mp in inputs.model_params)
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    a, b = inputs.tensors
    if inputs.base is not None:
        a, b = a - inputs.base, b - inputs.base
    shape = a.shape
    if inputs.params["nuslerp_flatten"] or a.dim() < 2:  # a vector has only one direction to take
        out = slerp_rows(t, a.reshape(1, -1), b.reshape(1, -1)).reshape(shape)
    elif inputs.params["nuslerp_row_wise"]:
        out = slerp_rows(t, a.movedim(0, -1), b.movedim(0, -1)).movedim(-1, 0)
    else:
        out = slerp_rows(t, a, b)
    return out if inputs.base is None else inputs.base + out


NUSLERP = Operator(
    name="nuslerp",
    apply=nuslerp_merge,
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
)
