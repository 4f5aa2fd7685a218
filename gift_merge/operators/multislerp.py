"""Multi-SLERP: barycentric interpolation of any number of models on the hypersphere.

With x_i the flattened inputs (task vectors θ_i − θ_b when a base is given), w normalised to sum 1 when
``normalize_weights`` (default true) and ε = ``eps``:

    u_i = x_i/(‖x_i‖ + ε),  m = Σ_i w_i u_i,  m̂ = m/‖m‖
    T = Σ_i w_i (u_i − ⟨u_i, m̂⟩ m̂)                      (weighted mean in the tangent space at m̂)
    d = m̂·cos(‖T‖ + ε) + T·sin(‖T‖ + ε)/(‖T‖ + ε)        (exponential map back to the sphere)
    θ = (Σ_i w_i ‖x_i‖)·d  (+ θ_b)

Note: T vanishes identically (Σ_i w_i u_i − ⟨Σ_i w_i u_i, m̂⟩m̂ = m − ‖m‖m̂ = 0), so the result is the
normalised weighted mean of the unit vectors scaled by the weighted mean norm; the tangent step is kept
so that rounding matches mergekit, which computes it the same way.

If ‖m‖ < ε the mean direction is undefined: two inputs fall back to Σ_i w_i x_i (+ θ_b), more raise.
A single input is returned as is. Goddard, "Multi-SLERP",
https://goddard.blog/posts/multislerp-wow-what-a-cool-idea ; the tangent-space mean follows Buss &
Fillmore, "Spherical averages and applications to spherical splines and interpolation", ACM TOG 2001,
https://doi.org/10.1145/502122.502124 (no arXiv paper).

Deviation: with ``normalize_weights`` and weights summing to 0 mergekit divides by zero and writes NaN;
here the parameter check rejects that before any tensor is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from gift_merge.errors import GiftMergeError

from .base import Operands, Operator, Param
from .checks import WEIGHT, interval
from .reductions import flat_dot, flat_norm


def check_multislerp(params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]) -> str | None:
    total = sum(float(mp["weight"]) for mp in model_params)
    if params["normalize_weights"] and len(model_params) > 1 and abs(total) < 1e-8:
        return f"weight values sum to {total}, so normalize_weights: true would divide by zero"
    return None


def multislerp_merge(operands: Operands[Any]) -> None:
    """The module docstring's formula on the whole flattened tensor (its norms span all of it)."""
    backend, whole = operands.backend, slice(0, operands.numel)
    base = operands.base.read(whole) if operands.base is not None else None
    if len(operands.sources) == 1:
        operands.out.write(whole, operands.sources[0].read(whole))
        return
    eps = float(operands.params["eps"])
    xs = [source.read(whole) if base is None else source.read(whole) - base for source in operands.sources]
    weights = [float(mp["weight"]) for mp in operands.model_params]
    if operands.params["normalize_weights"]:
        total = sum(weights)
        weights = [w / total for w in weights]

    norms = [flat_norm(backend, x) for x in xs]
    units = [x / (n + eps) for x, n in zip(xs, norms, strict=True)]
    mean = sum((w * u for w, u in zip(weights, units, strict=True)), backend.zeros_like(xs[0]))
    mean_norm = flat_norm(backend, mean)
    if mean_norm < eps:
        if len(xs) != 2:
            raise GiftMergeError(
                f"multislerp: the weighted mean direction of {operands.tensor_name or 'a tensor'} is zero "
                "(antipodal inputs whose weights cancel); change the weights"
            )
        out = weights[0] * xs[0] + weights[1] * xs[1]
        operands.out.write(whole, out if base is None else base + out)
        return
    mean = mean / mean_norm

    tangent = backend.zeros_like(mean)
    for w, u in zip(weights, units, strict=True):
        tangent += w * (u - flat_dot(backend, u, mean) * mean)
    angle = flat_norm(backend, tangent) + eps
    direction = mean * math.cos(angle) + tangent * (math.sin(angle) / angle)
    scale = sum(w * n for w, n in zip(weights, norms, strict=True))
    out = direction * scale
    operands.out.write(whole, out if base is None else base + out)


MULTISLERP = Operator(
    name="multislerp",
    merge=multislerp_merge,
    params=(
        WEIGHT,
        Param("normalize_weights", True, kind=bool, doc="Scale the weights to sum to 1."),
        Param("eps", 1e-8, doc="Numerical guard for norms.", check=interval("eps", 0.0, math.inf, low_open=True)),
    ),
    base="optional",
    min_models=1,
    summary="Weighted spherical mean of several models, or of their task vectors over a base.",
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    memory="whole",
    check=check_multislerp,
)
