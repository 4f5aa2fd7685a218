"""Generalized task arithmetic (GTA): the pipeline behind task_arithmetic, TIES, DARE, breadcrumbs and DELLA.

For task vectors δ_i = θ_i − θ_b, a cut c_i (each method's own: magnitude, random, outlier band) and
weights w_i:

    Δ_i = w_i · c_i(δ_i)                         (c_i optionally L1-rescaled: ``rescale``)
    without consensus:  mixed = Σ_i Δ_i,        divisor = Σ_i w_i        (|divisor| < 1e-8 → 1)
    with consensus:     σ = sign⁺(Σ_i Δ_i),  a_i = [sign Δ_i = σ],
                        mixed = Σ_i a_i Δ_i,    divisor = Σ_i a_i w_i    (0 → 1)
    θ = θ_b + λ · (mixed / divisor if normalize else mixed)

This is mergekit's ``GeneralizedTaskArithmeticMerge`` (sign election on the *weighted* deltas, σ = +1
where the sum is ≥ 0). Task arithmetic: https://arxiv.org/abs/2212.04089

Two passes over slices of the inputs: first each model's cut is decided (a threshold from a |δ| buffer,
or a mask), then the task vectors are formed, cut, weighted and mixed slice by slice and rounded into the
output. No input is ever widened whole; the one tensor-sized buffer is one model's |δ| at a time (for
the selections) or a bool mask per model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .base import Operands, Param, Source
from .checks import DENSITY, INT8_MASK, WEIGHT, finite
from .consensus import consensus_sum

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


@dataclass
class ThresholdCut:
    """A magnitude cut known before any slice is masked: keep |δ| > threshold, plus the first
    ``ties_left`` entries equal to it in index order (slices must come in index order), then rescale."""

    threshold: Any
    ties_left: int
    factor: float | None

    def apply(self, operands: Operands[Any], delta: Any, part: slice) -> Any:
        magnitude = operands.backend.abs(delta)
        keep = magnitude > self.threshold
        if self.ties_left > 0:
            tied = operands.backend.flatnonzero(magnitude == self.threshold)[: self.ties_left]
            keep[tied] = True
            self.ties_left -= len(tied)
        delta *= keep
        if self.factor is not None:
            delta *= self.factor
        return delta


@dataclass
class MaskCut:
    """A keep mask over the flat tensor (drawn or selected) and its rescale factor."""

    keep: Any
    factor: float | None

    def apply(self, operands: Operands[Any], delta: Any, part: slice) -> Any:
        delta *= self.keep[part]
        if self.factor is not None:
            delta *= self.factor
        return delta


Cut = ThresholdCut | MaskCut
CutRule = Callable[[Operands[Any], Source[Any], Mapping[str, Any], bool], "Cut | None"]
"""(operands, one model's source, its params, rescale) → its cut, or None to keep δ whole. Called once per
model, in input order (random cuts consume the generator in that order)."""

NO_CUT: CutRule = lambda operands, source, model_params, rescale: None  # noqa: E731
"""Task arithmetic: every task vector whole."""


def magnitudes(operands: Operands[Any], source: Source[Any]) -> Any:
    """|δ| of one input as one flat math-dtype buffer, built slice by slice."""
    assert operands.base is not None
    backend = operands.backend
    magnitude = backend.empty(operands.numel)
    for part in operands.chunks():
        backend.abs(source.read(part) - operands.base.read(part), out=magnitude[part])
    return magnitude


def empty_cut() -> ThresholdCut:
    """The cut that keeps nothing (k = 0)."""
    return ThresholdCut(math.inf, 0, None)


def gta_merge(operands: Operands[Any], cut: CutRule, consensus: bool) -> None:
    """θ_b + λ·mix(w_i·c_i(δ_i)) as in the module docstring, into ``operands.out``."""
    base_source = operands.base
    if base_source is None:
        raise ValueError("generalized task arithmetic needs a base tensor")
    params = operands.params
    rescale = bool(params["rescale"])
    weights = [float(mp["weight"]) for mp in operands.model_params]
    cuts = [cut(operands, s, mp, rescale) for s, mp in zip(operands.sources, operands.model_params, strict=True)]
    normalize, lam = bool(params["normalize"]), float(params["lambda"])
    for part in operands.row_chunks():  # any slicing gives the same bits; rows let adapters form ΔW by rows
        base = base_source.read(part)
        weighted = []
        for source, trim, weight in zip(operands.sources, cuts, weights, strict=True):
            delta = source.read(part) - base
            delta = trim.apply(operands, delta, part) if trim is not None else delta
            delta *= weight
            weighted.append(delta)
        mixed = _mix(operands, weighted, weights, consensus, normalize)
        if lam != 1:
            mixed *= lam
        mixed += base
        operands.out.write(part, mixed)


def _mix(operands: Operands[Any], weighted: list[Any], weights: list[float], consensus: bool, normalize: bool) -> Any:
    """The (normalised) combination of one slice's weighted deltas, without λ and the base."""
    divisor: Any
    if consensus:
        mixed, divisor = consensus_sum(operands.backend, weighted, weights)
    else:
        mixed = weighted[0]
        for delta in weighted[1:]:
            mixed += delta
        total = sum(weights)
        divisor = total if abs(total) >= 1e-8 else 1.0
    if normalize:
        mixed /= divisor
    return mixed
