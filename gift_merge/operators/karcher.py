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
from dataclasses import dataclass
from typing import Any

from .base import Operands, Operator, Param
from .checks import interval
from .held import Held
from .reductions import blocks


@dataclass(frozen=True)
class Step:
    """One finished iteration as scalars: the log map's terms (input index, cos φ_i, α φ_i/sin φ_i), ‖T‖ and
    the norm of the exponential map's result (None: it was not normalised)."""

    terms: tuple[tuple[int, float, float], ...]
    tangent_norm: float
    norm: float | None


def karcher_merge(operands: Operands[Any]) -> None:
    """The module docstring's iteration, streamed. Each step needs norms and inner products over the whole
    tensor, so it is a pass over slices (blocked sums, :mod:`reductions`: the bits of whole-tensor sums).
    While the unit inputs and u fit the job's buffer limit they are held and u is updated in place; beyond
    it u is formed again on each slice from the inputs and the finished steps' scalars, which repeats the
    same per-entry operations. Either way the result has the bits of the whole-tensor iteration."""
    backend, sources = operands.backend, operands.sources
    if len(sources) == 1:
        for part in operands.chunks():
            operands.out.write(part, sources[0].read(part))
        return
    max_iter = int(operands.params["max_iter"])
    tol = float(operands.params["tol"])

    squares = [0.0] * len(sources)
    for part in blocks(operands.numel):
        squares = [sq + backend.total(x * x) for x, sq in zip((s.read(part) for s in sources), squares, strict=True)]
    norms = [math.sqrt(sq) for sq in squares]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        for part in operands.chunks():
            operands.out.write(part, backend.zeros_like(sources[0].read(part)))
        return
    alpha = 1.0 / len(valid)

    def units(part: slice) -> dict[int, Any]:
        return {i: sources[i].read(part) / norms[i] for i in valid}

    def start(vs: dict[int, Any]) -> Any:
        return sum((alpha * v for v in vs.values()), backend.zeros_like(vs[valid[0]]))

    held = Held(operands, len(valid) + 1)  # the unit inputs, then u
    start_square = 0.0
    for part in blocks(operands.numel):
        vs = units(part)
        u = start(vs)
        held.keep(part, [*vs.values(), u])
        start_square = start_square + backend.total(u * u)
    start_norm = math.sqrt(start_square)
    steps: list[Step] = []  # what a slice replays when nothing is held
    for part in blocks(operands.numel) if held else ():
        *vs_held, u = held.at(part)
        held.set(-1, part, backend.copy(vs_held[0]) if start_norm < tol else u / start_norm)

    def tangent_of(vs: dict[int, Any], u: Any, terms: tuple[tuple[int, float, float], ...]) -> Any:
        tangent = backend.zeros_like(u)
        for i, cos_phi, coefficient in terms:
            tangent += coefficient * (vs[i] - cos_phi * u)
        return tangent

    def moved(u: Any, tangent: Any, tangent_norm: float) -> Any:
        return math.cos(tangent_norm) * u + (math.sin(tangent_norm) / tangent_norm) * tangent

    def current(part: slice) -> tuple[dict[int, Any], Any]:
        """The unit inputs and u after the finished steps, on one slice."""
        if held:
            *vs_held, u = held.at(part)
            return dict(zip(valid, vs_held, strict=True)), u
        vs = units(part)
        u = backend.copy(vs[valid[0]]) if start_norm < tol else start(vs) / start_norm
        for step in steps:
            u = moved(u, tangent_of(vs, u, step.terms), step.tangent_norm)
            if step.norm is not None:
                u = u / step.norm
        return vs, u

    for _ in range(max_iter):
        dots = [0.0] * len(valid)
        for part in blocks(operands.numel):
            vs, u = current(part)
            dots = [d + backend.total(u * vs[i]) for i, d in zip(valid, dots, strict=True)]
        terms = []
        for i, dot in zip(valid, dots, strict=True):
            cos_phi = min(1.0, max(-1.0, dot))
            phi = math.acos(cos_phi)
            if phi >= tol:
                terms.append((i, cos_phi, alpha * phi / math.sin(phi)))
        tangent_square = 0.0
        for part in blocks(operands.numel):
            vs, u = current(part)
            tangent = tangent_of(vs, u, tuple(terms))
            tangent_square = tangent_square + backend.total(tangent * tangent)
        tangent_norm = math.sqrt(tangent_square)
        if tangent_norm < tol:
            break
        moved_square = 0.0
        for part in blocks(operands.numel):
            vs, u = current(part)
            u = moved(u, tangent_of(vs, u, tuple(terms)), tangent_norm)
            held.set(-1, part, u)
            moved_square = moved_square + backend.total(u * u)
        moved_norm = math.sqrt(moved_square)
        steps.append(Step(tuple(terms), tangent_norm, moved_norm if moved_norm > tol else None))
        for part in blocks(operands.numel) if held and moved_norm > tol else ():
            held.set(-1, part, held.at(part)[-1] / moved_norm)

    scale = sum(norms) / len(norms)
    for part in operands.chunks():
        operands.out.write(part, scale * current(part)[1])


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
    memory="held",
)
