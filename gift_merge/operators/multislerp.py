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
from .held import Held
from .reductions import blocks


def check_multislerp(params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]) -> str | None:
    total = sum(float(mp["weight"]) for mp in model_params)
    if params["normalize_weights"] and len(model_params) > 1 and abs(total) < 1e-8:
        return f"weight values sum to {total}, so normalize_weights: true would divide by zero"
    return None


def multislerp_merge(operands: Operands[Any]) -> None:
    """The module docstring's formula, streamed: each norm and inner product spans the whole tensor, so it
    is a pass over slices (blocked sums, :mod:`reductions`: the bits of one whole-tensor sum). While the u_i
    and m fit the job's buffer limit they are held between passes; beyond it every pass forms the same
    per-entry values again from the inputs, so either way the bits are the same."""
    backend, sources, base = operands.backend, operands.sources, operands.base
    if len(sources) == 1:
        for part in operands.chunks():
            operands.out.write(part, sources[0].read(part))
        return
    eps = float(operands.params["eps"])
    weights = [float(mp["weight"]) for mp in operands.model_params]
    if operands.params["normalize_weights"]:
        total = sum(weights)
        weights = [w / total for w in weights]
    held = Held(operands, len(sources) + 1)  # the u_i, then m (m̂ after pass 3)

    def inputs(part: slice) -> tuple[Any, list[Any]]:
        """The base's slice (or None) and the x_i of one slice."""
        b = base.read(part) if base is not None else None
        return b, [source.read(part) if b is None else source.read(part) - b for source in sources]

    def units_and_mean(xs: list[Any]) -> tuple[list[Any], Any]:
        units = [x / (n + eps) for x, n in zip(xs, norms, strict=True)]
        return units, sum((w * u for w, u in zip(weights, units, strict=True)), backend.zeros_like(xs[0]))

    squares = [0.0] * len(sources)  # pass 1: ‖x_i‖
    for part in blocks(operands.numel):
        xs = inputs(part)[1]
        squares = [sq + backend.total(x * x) for x, sq in zip(xs, squares, strict=True)]
    norms = [math.sqrt(sq) for sq in squares]

    mean_square = 0.0  # pass 2: ‖m‖
    for part in blocks(operands.numel):
        units, mean = units_and_mean(inputs(part)[1])
        held.keep(part, [*units, mean])
        mean_square = mean_square + backend.total(mean * mean)
    mean_norm = math.sqrt(mean_square)
    if mean_norm < eps:
        if len(sources) != 2:
            raise GiftMergeError(
                f"multislerp: the weighted mean direction of {operands.tensor_name or 'a tensor'} is zero "
                "(antipodal inputs whose weights cancel); change the weights"
            )
        for part in operands.chunks():
            b, xs = inputs(part)
            out = weights[0] * xs[0] + weights[1] * xs[1]
            operands.out.write(part, out if b is None else b + out)
        return

    def direction_parts(part: slice) -> tuple[list[Any], Any]:
        """The u_i and m̂ of one slice."""
        if held:
            *units, mean_hat = held.at(part)
            return units, mean_hat
        units, mean = units_and_mean(inputs(part)[1])
        return units, mean / mean_norm

    along = [0.0] * len(sources)  # pass 3: ⟨u_i, m̂⟩
    for part in blocks(operands.numel):
        if held:
            *units, mean = held.at(part)
            mean_hat = mean / mean_norm
            held.keep(part, [*units, mean_hat])
        else:
            units, mean_hat = direction_parts(part)
        along = [a + backend.total(u * mean_hat) for u, a in zip(units, along, strict=True)]

    def tangent_of(units: list[Any], mean: Any) -> Any:
        tangent = backend.zeros_like(mean)
        for w, u, a in zip(weights, units, along, strict=True):
            tangent += w * (u - a * mean)
        return tangent

    tangent_square = 0.0  # pass 4: ‖T‖
    for part in blocks(operands.numel):
        tangent = tangent_of(*direction_parts(part))
        tangent_square = tangent_square + backend.total(tangent * tangent)
    angle = math.sqrt(tangent_square) + eps
    scale = sum(w * n for w, n in zip(weights, norms, strict=True))

    for part in operands.chunks():  # pass 5: the exponential map, scaled
        units, mean = direction_parts(part)
        direction = mean * math.cos(angle) + tangent_of(units, mean) * (math.sin(angle) / angle)
        out = direction * scale
        operands.out.write(part, out if base is None else base.read(part) + out)


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
    memory="held",
    check=check_multislerp,
)
