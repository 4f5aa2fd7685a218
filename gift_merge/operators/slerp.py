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

from typing import Any

import numpy as np

from gift_merge.floatbits import narrow
from gift_merge.lazy import torch

from . import gta, kernels
from .base import MergeInputs, Operator, Param, StreamInputs
from .checks import interval
from .kernels import slerp_coefficients, slerp_flat


def slerp_merge(inputs: MergeInputs) -> torch.Tensor:
    if inputs.base is None:
        raise ValueError("slerp needs a base tensor")
    return slerp_flat(float(inputs.params["t"]), inputs.base, inputs.tensors[0])


def _coefficients(stream: StreamInputs[Any]) -> tuple[float, float]:
    """(s0, s1) from the norms and the inner product, summed over the blocks :func:`kernels.flat_dot`
    sums, a slice at a time; torch tensors or numpy arrays alike (one sum, :func:`kernels.block_total`)."""
    base, other = stream.base, stream.tensors[0]
    norm0_sq = norm1_sq = dot = 0.0
    for start in range(0, len(base), kernels.REDUCE_BLOCK):
        part = slice(start, start + kernels.REDUCE_BLOCK)
        v0, v1 = stream.widen(base[part]), stream.widen(other[part])
        norm0_sq += kernels.block_total(v0 * v0)
        norm1_sq += kernels.block_total(v1 * v1)
        dot += kernels.block_total(v0 * v1)
    return slerp_coefficients(float(stream.params["t"]), norm0_sq, norm1_sq, dot)


def slerp_stream(stream: StreamInputs[torch.Tensor]) -> torch.Tensor:
    """:func:`slerp_merge` reading the two inputs twice, a slice at a time: once for the norms and the
    inner product, once for the interpolation."""
    base, other = stream.base, stream.tensors[0]
    n = base.numel()
    s0, s1 = _coefficients(stream)
    out = torch.empty(n, dtype=stream.out_dtype)
    for start in range(0, n, gta.CHUNK):
        part = slice(start, start + gta.CHUNK)
        out[part] = s0 * stream.widen(base[part]) + s1 * stream.widen(other[part])
    return out


def slerp_numpy_stream(stream: StreamInputs[np.ndarray]) -> np.ndarray:
    """:func:`slerp_stream` in numpy: the same blocks, sums and roundings; returns the output's bits."""
    base, other = stream.base, stream.tensors[0]
    n = base.size
    s0, s1 = _coefficients(stream)
    out = np.empty(n, dtype=stream.out_dtype.storage)
    for start in range(0, n, gta.CHUNK):
        part = slice(start, start + gta.CHUNK)
        mixed = stream.widen(base[part]) * s0
        mixed += stream.widen(other[part]) * s1
        narrow(mixed, stream.out_dtype, out[part])
    return out


SLERP = Operator(
    name="slerp",
    apply=slerp_merge,
    params=(Param("t", doc="Interpolation factor: 0 is the base, 1 the other model.", check=interval("t", 0.0, 1.0)),),
    base="required",
    min_models=1,
    max_models=1,
    summary="Spherical interpolation between the base and one other model.",
    paper="https://doi.org/10.1145/325165.325242",
    stream=slerp_stream,
    numpy_stream=slerp_numpy_stream,
)
