"""SCE: select, calculate, erase — variance-selected, energy-weighted TIES without user weights.

    τ_i = θ_i − θ_b
    select (select_topk < 1): keep the k = ⌊nnz(var)·select_topk⌋ positions of largest variance across
        models, var = population variance of the τ_i at each position; the mask is shared by all τ_i
    calculate: ω_i = mean(τ_i²)/Σ_j mean(τ_j²)   (uniform when every τ_i is zero)
    erase: σ = +1 where Σ_i τ_i ≥ 0 else −1, m_i = [sign τ_i = σ]   (on the unweighted τ)
    θ = θ_b + Σ_i ω_i m_i τ_i / Σ_i ω_i m_i     (0 divisor → 1)

Wan et al., "FuseChat: Knowledge Fusion of Chat Models", https://arxiv.org/abs/2408.07990

``select_topk`` must be in (0, 1]: mergekit turns ≤ 0 into "keep nothing" (the base) and > 1 into
"keep all". Deviations from mergekit, both where a fixed threshold meets a scale-dependent quantity:
- mergekit falls back to uniform ω when Σ_j mean(τ_j²) < 1e-6. Fine-tuning deltas of size ~1e-4 to
  1e-3 have mean squares far below that, so the weights silently become uniform on typical tensors.
  Here the fallback applies only when the sum is exactly 0.
- mergekit divides by max(Σ_i ω_i m_i, 1e-6), which under-weights positions where only a model with
  ω < 1e-6 agrees. Here only a zero divisor (no agreeing model, so a zero numerator) is replaced by 1.

The sign election is on the unweighted τ_i, unlike TIES' on the weighted deltas (:mod:`consensus`), so it
is written here. The selection ranks var with the tie order of :mod:`selection` (equal variances kept in
index order; a NaN variance is never kept, as there).

Passes over slices of the inputs, τ_i formed again in each: (select) the k-th largest var, found on one
var buffer while it fits the job's share of the memory budget (:meth:`~.base.Operands.cuts_fit`), else by
radix passes over var's float bits (:func:`~gift_merge.engine.selection.streamed_kth_largest`), the same
value either way; (calculate) the selection's mask from var, and mean(τ_i²) as the float64 sum of the
float64 sums of the summation blocks (:mod:`reductions`) over N, so it has the same bits however the tensor
is sliced (before streaming it was one pairwise float64 mean of the whole tensor: ω may differ in its last
place, which rarely moves an output bit); (erase) the mix, slice by slice, with the mask the calculate
pass kept on a bool buffer while the cut buffers fit, else with the mask decided again from var (the same
cut on the same values, so the same mask).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from gift_merge.engine.selection import HISTOGRAM_BINS, streamed_kth_largest

from . import gta
from .base import Operands, Operator, Param
from .checks import INT8_MASK, interval
from .gta import ThresholdCut, empty_cut
from .reductions import blocks

if TYPE_CHECKING:
    from gift_merge.engine.backend import Backend

Selection = Callable[[slice, list[Any]], Any]
"""(a slice, its τ_i) → the slice's keep mask; called for the slices of one pass in index order."""


def sce_merge(operands: Operands[Any]) -> None:
    if operands.base is None:
        raise ValueError("sce needs a base tensor")
    if operands.numel == 0:
        return
    backend = operands.backend
    select_topk = float(operands.params["select_topk"])
    cut = variance_cut(operands, select_topk) if select_topk < 1 else None  # select
    held = backend.empty(operands.numel, "bool") if cut is not None and operands.cuts_fit() else None
    omega = weights(operands, deciding(backend, cut, held))  # calculate, keeping the mask in ``held``
    kept = deciding(backend, cut) if held is None else lambda part, taus: held[part]
    for part in operands.chunks():  # erase and mix
        base, taus = _slice(operands, part, kept)
        operands.out.write(part, base + _erase_and_mix(backend, base, taus, omega))


def _taus(operands: Operands[Any], part: slice) -> tuple[Any, list[Any]]:
    """One slice of the base and of every τ_i."""
    assert operands.base is not None
    base = operands.base.read(part)
    return base, [source.read(part) - base for source in operands.sources]


def _slice(operands: Operands[Any], part: slice, kept: Selection | None) -> tuple[Any, list[Any]]:
    """One slice of the base and of every τ_i, the selection applied (slices in index order)."""
    base, taus = _taus(operands, part)
    if kept is not None:
        mask = kept(part, taus)
        taus = [operands.backend.where(mask, t, 0.0) for t in taus]
    return base, taus


def deciding(backend: Backend, cut: ThresholdCut | None, held: Any = None) -> Selection | None:
    """The selection of one pass decided from each slice's variances (None: every entry kept), on a copy of
    ``cut``, which counts its ties as the slices go by; each slice's mask is also stored in ``held``, a flat
    bool buffer, when one is given."""
    if cut is None:
        return None
    counter = copy.copy(cut)

    def kept(part: slice, taus: list[Any]) -> Any:
        mask = counter.keep(backend, variance(backend, taus))
        if held is not None:
            held[part] = mask
        return mask

    return kept


def variance(backend: Backend, taus: list[Any]) -> Any:
    """The population variance of the τ_i at each entry of a slice."""
    n = len(taus)
    mean = sum(taus[1:], backend.copy(taus[0])) / n
    return sum(((t - mean) ** 2 for t in taus), backend.zeros_like(mean)) / n


def variance_cut(operands: Operands[Any], select_topk: float) -> ThresholdCut | None:
    """The cut keeping the k largest variances (as :func:`~.selection.top_k`), or None to keep every entry.
    A fresh copy serves each pass (:func:`deciding`): it counts its ties as the slices go by."""
    backend, numel = operands.backend, operands.numel
    if operands.selects_on_buffer():
        var = backend.empty(numel, operands.math_dtype.name)
        for part in operands.chunks():
            var[part] = variance(backend, _taus(operands, part)[1])
        k = int(backend.count(var) * select_topk)
        if k <= 0 or k >= numel:
            return _keep_all_or_none(k)
        threshold, above = backend.kth_largest_and_count(var, k, in_place=True)  # nothing reads var after
        return ThresholdCut(threshold, k - above, None)
    nonzero = 0

    def histogram(high: int | None) -> np.ndarray:
        nonlocal nonzero
        counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
        for part in operands.chunks(gta.HISTOGRAM_SLICE):
            var = variance(backend, _taus(operands, part)[1])
            if high is None:
                nonzero += backend.count(var)
            counts += backend.bit_histogram(backend.abs(var), high)  # abs: a NaN may carry a sign bit
        return counts

    high = histogram(None)  # the first radix pass counts the non-zero variances too
    k = int(nonzero * select_topk)
    if k <= 0 or k >= numel:
        return _keep_all_or_none(k)
    threshold, above = streamed_kth_largest(lambda bits: high if bits is None else histogram(bits), k)
    return ThresholdCut(threshold, k - above, None)


def _keep_all_or_none(k: int) -> ThresholdCut | None:
    """The cut for k ≤ 0 (nothing kept, not even a NaN variance) or k ≥ N (everything, NaNs too)."""
    return empty_cut() if k <= 0 else None


def weights(operands: Operands[Any], kept: Selection | None) -> list[float]:
    """ω_i: each mean(τ_i²) of the selected τ_i as a blocked float64 sum over N, normalised (uniform when all
    are 0)."""
    backend, n = operands.backend, len(operands.sources)
    sums = [0.0] * n
    for part in blocks(operands.numel):
        for i, tau in enumerate(_slice(operands, part, kept)[1]):
            sums[i] += backend.total(backend.astype(tau**2, "float64"))
    energy = [s / operands.numel for s in sums]
    total = sum(energy)
    return [e / total for e in energy] if total > 0 else [1.0 / n] * n


def _erase_and_mix(backend: Backend, base: Any, taus: list[Any], omega: list[float]) -> Any:
    """Σ_i ω_i m_i τ_i / Σ_i ω_i m_i for one slice (σ elected on the unweighted τ_i)."""
    sum_of_taus = backend.copy(taus[0])
    for tau in taus[1:]:
        sum_of_taus += tau
    elected_plus = sum_of_taus >= 0  # σ = +1 there, −1 elsewhere (a NaN sum included)
    elected_minus = ~elected_plus
    mixed, divisor = backend.zeros_like(base), backend.zeros_like(base)
    for tau, weight in zip(taus, omega, strict=True):
        agrees = (tau > 0) & elected_plus | (tau < 0) & elected_minus  # sign τ_i = σ (a zero τ_i never)
        mixed += backend.where(agrees, tau * weight, 0.0)
        divisor += backend.astype(agrees, divisor.dtype) * weight
    divisor[divisor == 0] = 1
    return mixed / divisor


SCE = Operator(
    name="sce",
    merge=sce_merge,
    params=(
        Param(
            "select_topk",
            1.0,
            doc="Fraction of positions (by variance across models) kept before merging.",
            check=interval("select_topk", 0.0, 1.0, low_open=True),
        ),
        INT8_MASK,
    ),
    base="required",
    min_models=1,
    summary="Keep high-variance positions, weight models by delta energy, TIES-style sign erase and mean.",
    paper="https://arxiv.org/abs/2408.07990",
    memory="stream_cuts",
)
