"""The streamed GTA path in numpy (TIES, DARE, breadcrumbs), the twin of :func:`gta.gta_stream`.

Same two phases: each model's cut found on a flat |δ| buffer (or drawn slice by slice), then the task
vectors formed, trimmed, weighted and mixed slice by slice, rounded into the output's bits. Every step
repeats the torch path's operations in its order, so the two write the same bytes; DELLA, whose row
ranks need a scatter numpy does 10× slower than torch, stays on torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gift_merge.floatbits import narrow

from . import array_kernels, gta, kernels
from .base import StreamInputs

Stream = StreamInputs[np.ndarray]


@dataclass
class MagnitudeCut:
    """:class:`gta._MagnitudeCut` in numpy: the k-th largest |δ|, the ties still to keep, the factor."""

    threshold: np.floating | float
    ties_left: int
    factor: float | None

    def apply(self, delta: np.ndarray, part: slice) -> np.ndarray:
        magnitude = np.abs(delta)
        keep = magnitude > self.threshold
        if self.ties_left > 0:
            tied = np.flatnonzero(magnitude == self.threshold)[: self.ties_left]
            keep[tied] = True
            self.ties_left -= len(tied)
        delta *= keep
        if self.factor is not None:
            delta *= self.factor
        return delta


@dataclass
class KeepMask:
    """:class:`gta.KeepMask` in numpy: a drawn or selected keep mask over the flat tensor, and its factor."""

    keep: np.ndarray
    factor: float | None

    def apply(self, delta: np.ndarray, part: slice) -> np.ndarray:
        delta *= self.keep[part]
        if self.factor is not None:
            delta *= self.factor
        return delta


Cut = MagnitudeCut | KeepMask
CutBuilder = Callable[[Stream, np.ndarray, Mapping[str, Any], bool], "Cut | None"]


def magnitudes(stream: Stream, tensor: np.ndarray) -> np.ndarray:
    """|δ| of one input as one float32 buffer, built slice by slice."""
    n = stream.base.size
    magnitude = np.empty(n, dtype=np.float32)
    for start in range(0, n, gta.CHUNK):
        part = slice(start, start + gta.CHUNK)
        np.abs(stream.widen(tensor[part]) - stream.widen(stream.base[part]), out=magnitude[part])
    return magnitude


def magnitude_cut(stream: Stream, tensor: np.ndarray, model_params: Mapping[str, Any], rescale: bool) -> Cut | None:
    """TIES: :func:`gta.magnitude_cut`."""
    density = float(model_params["density"])
    if density >= 1:
        return None
    n = stream.base.size
    k = int(density * n)
    if k <= 0:
        return MagnitudeCut(math.inf, 0, None)
    magnitude = magnitudes(stream, tensor)
    threshold, above = kernels.kth_largest_and_count(magnitude, k, in_place=not rescale)
    factor = None
    if rescale:
        factor = array_kernels.kept_l1_factor(magnitude, array_kernels.cut_mask(magnitude, threshold, above, k))
    return MagnitudeCut(threshold, k - above, factor)


def random_cut(stream: Stream, tensor: np.ndarray, model_params: Mapping[str, Any], rescale: bool) -> Cut | None:
    """DARE: :func:`gta.random_cut`, the same draws slice by slice."""
    density = float(model_params["density"])
    n = stream.base.size
    if density >= 1:
        kernels.skip_draws(stream.generator, n)
        return None
    if gta.CHUNK % 2:
        raise ValueError(f"gta.CHUNK must be even to draw slice by slice, got {gta.CHUNK}")
    keep = np.empty(n, dtype=bool)
    for start in range(0, n, gta.CHUNK):
        part = slice(start, start + gta.CHUNK)
        keep[part] = kernels.random_keep_array(stream.generator, len(range(n)[part]), density)
    return KeepMask(keep, _kept_l1_factor(stream, tensor, keep) if rescale else None)


def _kept_l1_factor(stream: Stream, tensor: np.ndarray, keep: np.ndarray) -> float | None:
    """:func:`gta._kept_l1_factor`: both norms summed block by block as |δ| is formed, no buffer."""
    before = after = 0.0
    for start in range(0, stream.base.size, kernels.REDUCE_BLOCK):
        part = slice(start, start + kernels.REDUCE_BLOCK)
        magnitude = np.abs(stream.widen(tensor[part]) - stream.widen(stream.base[part]))
        before += kernels.array_total(magnitude)
        magnitude *= keep[part]
        after += kernels.array_total(magnitude)
    return kernels.l1_factor(before, after)


def outlier_cut(stream: Stream, tensor: np.ndarray, model_params: Mapping[str, Any], rescale: bool) -> Cut | None:
    """Breadcrumbs: :func:`breadcrumbs.outlier_cut`."""
    density = float(model_params["density"])
    if density >= 1:
        return None
    magnitude = magnitudes(stream, tensor)
    keep = array_kernels.breadcrumbs_mask(magnitude, density, float(model_params["gamma"]))
    return KeepMask(keep, array_kernels.kept_l1_factor(magnitude, keep) if rescale else None)


def gta_stream(stream: Stream, cut: CutBuilder, consensus: bool) -> np.ndarray:
    """:func:`gta.gta_stream` in numpy; returns the output's bits."""
    params = stream.params
    rescale = bool(params["rescale"])
    weights = [float(mp["weight"]) for mp in stream.model_params]
    cuts = [cut(stream, t, mp, rescale) for t, mp in zip(stream.tensors, stream.model_params, strict=True)]
    normalize, lam = bool(params["normalize"]), float(params["lambda"])
    n = stream.base.size
    out = np.empty(n, dtype=stream.out_dtype.storage)
    for start in range(0, n, gta.CHUNK):
        part = slice(start, start + gta.CHUNK)
        base = stream.widen(stream.base[part])
        weighted = []
        for t, trim, w in zip(stream.tensors, cuts, weights, strict=True):
            d = stream.widen(t[part]) - base
            d = trim.apply(d, part) if trim is not None else d
            d *= w
            weighted.append(d)
        mixed = _mix(weighted, weights, consensus, normalize)
        if lam != 1:
            mixed *= lam
        mixed += base
        narrow(mixed, stream.out_dtype, out[part])
    return out


def _mix(weighted: list[np.ndarray], weights: list[float], consensus: bool, normalize: bool) -> np.ndarray:
    """:func:`gta._mix`."""
    divisor: np.ndarray | float
    if consensus:
        mixed, divisor = array_kernels.consensus_sum(weighted, weights)
    else:
        mixed = weighted[0]
        for d in weighted[1:]:
            mixed += d
        total = sum(weights)
        divisor = total if abs(total) >= 1e-8 else 1.0
    if normalize:
        mixed /= divisor
    return mixed
