"""Karcher mean: the Riemannian centre of mass of the inputs' directions, scaled by their mean norm.

With x_i the flattened inputs, equal weights α_i = 1/N, u_i = x_i/‖x_i‖ and only inputs with ‖x_i‖ > tol
taking part in the direction (their α renormalised to sum 1):

    u ← normalise(Σ α_i u_i)           (if that norm is below tol, u ← u_1)
    repeat up to max_iter times:
        φ_i = arccos clamp(⟨u, u_i⟩, −1, 1)
        T = Σ_{i: φ_i ≥ tol} α_i (φ_i/sin φ_i)(u_i − cos φ_i · u)      (log map, averaged)
        stop if ‖T‖ < tol
        u ← normalise(cos‖T‖ · u + sin‖T‖ · T/‖T‖)                     (exponential map)
    θ = (Σ_i ‖x_i‖/N) · u              (every input counts here, zero-norm ones too)

Karcher, "Riemannian center of mass and mollifier smoothing", CPAM 1977,
https://doi.org/10.1002/cpa.3160300502 ; Buss & Fillmore 2001, https://doi.org/10.1145/502122.502124
(no arXiv paper). As in mergekit the weights are uniform and there is no base. Scalars are float64.
"""

from __future__ import annotations

import math
from typing import Any

from .base import Operands, Operator, Param
from .checks import interval
from .reductions import flat_dot, flat_norm


def karcher_merge(operands: Operands[Any]) -> None:
    """The module docstring's iteration on the whole flattened tensor (every step takes norms over all of it)."""
    backend, whole = operands.backend, slice(0, operands.numel)
    if len(operands.sources) == 1:
        operands.out.write(whole, operands.sources[0].read(whole))
        return
    max_iter = int(operands.params["max_iter"])
    tol = float(operands.params["tol"])
    xs = [source.read(whole) for source in operands.sources]
    norms = [flat_norm(backend, x) for x in xs]
    valid = [(x / n) for x, n in zip(xs, norms, strict=True) if n > tol]
    if not valid:
        operands.out.write(whole, backend.zeros_like(xs[0]))
        return
    alpha = 1.0 / len(valid)

    u = sum((alpha * v for v in valid), backend.zeros_like(xs[0]))
    u_norm = flat_norm(backend, u)
    u = backend.copy(valid[0]) if u_norm < tol else u / u_norm

    for _ in range(max_iter):
        tangent = backend.zeros_like(u)
        for v in valid:
            cos_phi = min(1.0, max(-1.0, flat_dot(backend, u, v)))
            phi = math.acos(cos_phi)
            if phi < tol:
                continue
            tangent += (alpha * phi / math.sin(phi)) * (v - cos_phi * u)
        t_norm = flat_norm(backend, tangent)
        if t_norm < tol:
            break
        u = math.cos(t_norm) * u + (math.sin(t_norm) / t_norm) * tangent
        u_norm = flat_norm(backend, u)
        if u_norm > tol:
            u = u / u_norm

    scale = sum(norms) / len(norms)
    operands.out.write(whole, scale * u)


KARCHER = Operator(
    name="karcher",
    merge=karcher_merge,
    params=(
        Param("max_iter", 10, kind=int, doc="Most iterations.", check=interval("max_iter", 0, math.inf)),
        Param("tol", 1e-5, doc="Convergence tolerance on ‖T‖ and angles.", check=interval("tol", 0.0, math.inf)),
    ),
    base="ignored",
    min_models=1,
    summary="Riemannian (Karcher) mean of the inputs' directions, scaled by their mean norm.",
    paper="https://doi.org/10.1002/cpa.3160300502",
    memory="whole",
)
