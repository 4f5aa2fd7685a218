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
the selections) or a bool mask per model. A magnitude threshold that would not fit the job's share of the
memory budget is found by radix passes over |δ| formed again slice by slice (:func:`streamed_threshold`), with the
same result.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gift_merge.engine.selection import HISTOGRAM_BINS, streamed_kth_largest

from .base import Operands, Param, Source
from .checks import DENSITY, INT8_MASK, WEIGHT, finite
from .consensus import consensus_sum
from .rescale import streamed_l1_factor

if TYPE_CHECKING:
    from gift_merge.engine.backend import Backend

HISTOGRAM_SLICE = 1 << 20
"""Entries per slice of a radix pass: large enough that the 2¹⁶-bin counts cost little per entry."""

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


class MagnitudeCut:
    """A cut that decides each slice's mask from the slice's |δ| alone (slices in index order), then
    rescales by ``factor``."""

    factor: float | None

    def keep(self, backend: Backend, magnitude: Any) -> Any:
        """The mask of the next slice's |δ|."""
        raise NotImplementedError

    def apply(self, operands: Operands[Any], delta: Any, part: slice) -> Any:
        delta *= self.keep(operands.backend, operands.backend.abs(delta))
        if self.factor is not None:
            delta *= self.factor
        return delta


@dataclass
class ThresholdCut(MagnitudeCut):
    """A magnitude cut known before any slice is masked: keep |δ| > threshold, plus the first
    ``ties_left`` entries equal to it in index order (slices must come in index order), then rescale."""

    threshold: Any
    ties_left: int
    factor: float | None

    def keep(self, backend: Backend, magnitude: Any) -> Any:
        """The mask of the next slice's |δ|, taking ties in index order."""
        keep = magnitude > self.threshold
        if self.ties_left > 0:
            tied = backend.flatnonzero(magnitude == self.threshold)[: self.ties_left]
            keep[tied] = True
            self.ties_left -= len(tied)
        return keep


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


@dataclass
class ReplayCut:
    """A keep mask too large to hold, made again a slice at a time as the slices are cut, in order
    (:class:`~.draws.Replay`), and its rescale factor."""

    mask: Callable[[slice], Any]
    factor: float | None

    def apply(self, operands: Operands[Any], delta: Any, part: slice) -> Any:
        delta *= self.mask(part)
        if self.factor is not None:
            delta *= self.factor
        return delta


Cut = Any
"""A cut: anything with ``apply(operands, delta, part)`` that masks (and rescales) one slice of δ in index
order: :class:`ThresholdCut`, :class:`MaskCut`, breadcrumbs' band."""
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


def streamed_threshold(operands: Operands[Any], source: Source[Any], k: int) -> tuple[float, int]:
    """The k-th largest float32 |δ| of one input and how many exceed it (1 ≤ k ≤ N), without a |δ| buffer:
    radix passes over |δ| formed again slice by slice
    (:func:`~gift_merge.engine.selection.streamed_kth_largest`); the same answer as on a buffer."""
    assert operands.base is not None
    backend, base = operands.backend, operands.base

    def histogram(high: int | None) -> np.ndarray:
        counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
        for part in operands.chunks(HISTOGRAM_SLICE):
            counts += backend.bit_histogram(backend.abs(source.read(part) - base.read(part)), high)
        return counts

    return streamed_kth_largest(histogram, k)


def kept_l1_factor(operands: Operands[Any], source: Source[Any], cut: MagnitudeCut) -> float | None:
    """The L1 rescale factor of a cut decided slice by slice, with |δ| formed slice by slice (on a copy of
    the cut, which counts its ties as it goes): the same factor as on a buffer."""
    counter = copy.deepcopy(cut)
    return streamed_l1_factor(operands, source, lambda part, magnitude: counter.keep(operands.backend, magnitude))


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
    for part in operands.row_pieces():  # any in-order slicing gives the same bits; pieces stay in cache
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
