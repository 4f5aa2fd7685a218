"""Arcee Fusion: take the other model's value only where its change from the base is an outlier of importance.

Rows run along the last dimension (a vector is one row); softmax is taken along each row.

    δ = θ_1 − θ_b
    p = softmax(θ_1) + 10⁻⁸,   q = softmax(θ_b) + 10⁻⁸                       (per row)
    KL = Σ_row p · log(p/q)                                                   (one value per row)
    s = |δ| · KL                                                               (importance, per entry)
    Q_f = the ⌊f·(N − 1)⌋-th smallest of the N entries of s   (0-based; no interpolation)
    τ = Q_0.5 + 1.5 · (Q_0.75 − Q_0.25)                                        (Tukey's upper fence)
    θ = θ_b + δ · [s ≥ τ]

Arcee AI's method, published only as code in mergekit (``merge_methods/arcee_fusion.py``) with
https://arcee.ai as its reference; there is no paper.

Exactly one model besides the base, as in mergekit, and no parameters: mergekit 0.1.5 declares none for
this method and ignores any a recipe sets, so the global ``normalize`` and ``int8_mask`` that recipes
copied from TIES carry are accepted here and ignored (``Operator.ignores``, with an INFO line); any other
parameter is an error, as for every method. The quantiles are mergekit's: the lower order
statistic at index ⌊f·(N − 1)⌋ of the sorted importances, so equal importances need no tie order (a
value is selected, and every entry ≥ τ is kept). Deviations from mergekit 0.1.5:
- The KL is evaluated in float64 and rounded once to the compute dtype; mergekit evaluates it in float32.
  When the fine-tune is close to the base the KL of two nearly equal distributions cancels almost
  entirely, and float32 leaves a rounding error of ~10 % of it (the median over 64-wide rows with |δ| at
  5 % of the weights), which reorders the importances near τ. On the tiny Llama family of
  ``benchmarks/mergekit_parity.py`` (fine-tunes 1e-3·N(0, 1) on weights of σ 0.02) mergekit's float32
  masks and these differ on 32 % of the entries mergekit keeps, 0.4 % with changes of 1e-2; with mergekit
  computing in float64 (``dtype: float64``) the outputs are byte-identical. The float64 KL is the
  formula's value, and the same on every device.
- Above 10⁶ entries mergekit takes the quantiles of an unseeded random sample of 10⁶ importances (drawn
  with replacement), so its mask changes from run to run; here they are exact over the whole tensor.
- mergekit stores the mask as float32, which promotes a bfloat16 merge to float32 output tensors (its
  issue #604); here the output has the recipe's dtype like every other method.

- A row's KL that float64 rounds below zero counts as 0 (the KL of two distributions is ≥ 0), so every
  importance is ≥ 0 (or NaN) and orders like its float bits.

Passes over slices of whole rows: each row's KL (one value per row is kept); the three order statistics,
on an importance buffer while it fits the memory budget, else by radix passes over the importances formed
again (:func:`~gift_merge.engine.selection.streamed_kth_largest`, the same values); then the masked mix.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from gift_merge.engine import blocks
from gift_merge.engine.selection import HISTOGRAM_BINS, streamed_kth_largest

from .base import Operands, Operator

EPS = 1e-8
"""Added to both softmax distributions before the ratio, as mergekit does."""

FENCE = 1.5
"""Tukey's multiple of the interquartile range."""


def _softmax(backend: Any, rows: Any) -> Any:
    shifted = backend.exp(rows - backend.row_max(rows))
    return shifted / backend.row_sums(shifted)


def row_kl(backend: Any, theta: Any, base: Any) -> Any:
    """KL(softmax(θ) + ε ‖ softmax(θ_b) + ε) of each row of two (R, W) arrays, in float64, shape (R, 1)."""
    p = _softmax(backend, backend.astype(theta, "float64")) + EPS
    q = _softmax(backend, backend.astype(base, "float64")) + EPS
    kl = backend.row_sums(p * backend.log(p / q))
    return backend.where(kl < 0, 0.0, kl)  # Gibbs: KL ≥ 0; a negative sum is rounding residue (NaN stays)


def _dtype_name(values: Any) -> str:
    """A numpy dtype or a torch dtype as the backend's ``empty`` names it."""
    return str(values.dtype).removeprefix("torch.")


def arcee_fusion_merge(operands: Operands[Any]) -> None:
    base, other = operands.base, operands.sources[0]
    if base is None:
        raise ValueError("arcee_fusion needs a base tensor")
    backend, count = operands.backend, operands.numel
    if count == 0:
        return
    width = operands.shape[-1] if operands.shape else 1
    if len(operands.shape) <= 1:
        width = count  # a vector is one row
    # whole rows, a cache-sized piece at a time: the float64 softmaxes of a CHUNK of rows would go to memory
    parts = list(operands.chunks(max(1, blocks.PIECE // width) * width))

    kls = []
    for part in parts:  # first pass: each row's KL
        theta, b = other.read(part), base.read(part)
        kls.append(backend.astype(row_kl(backend, theta.reshape(-1, width), b.reshape(-1, width)), theta.dtype))

    def importance(part: slice, kl: Any) -> tuple[Any, Any, Any]:
        """θ_b, δ and s on one slice of whole rows."""
        b = base.read(part)
        delta = other.read(part) - b
        return b, delta, (backend.abs(delta).reshape(-1, width) * kl).reshape(-1)

    last = count - 1  # ascending index i is the (N − i)-th largest
    ranks = [count - index for index in (last // 4, last // 2, 3 * last // 4)]
    if operands.selects_on_buffer():  # an importance buffer
        buffer = backend.empty(count, _dtype_name(kls[0]))
        for part, kl in zip(parts, kls, strict=True):
            buffer[part] = importance(part, kl)[2]
        q1, median, q3 = (backend.kth_largest_and_count(buffer, k, in_place=True)[0] for k in ranks)
        del buffer
    else:  # radix passes over the importances formed again (s ≥ 0: KL ≥ 0 and |δ| ≥ 0)

        @functools.cache
        def histogram(high: int | None) -> np.ndarray:
            counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
            for part, kl in zip(parts, kls, strict=True):
                counts += backend.bit_histogram(importance(part, kl)[2], high)
            return counts

        q1, median, q3 = (np.float32(streamed_kth_largest(histogram, k)[0]) for k in ranks)
    threshold = median + (q3 - q1) * FENCE  # in the compute dtype, as mergekit's tensors

    for part, kl in zip(parts, kls, strict=True):  # last pass: the same importances, masked
        b, delta, scores = importance(part, kl)
        operands.out.write(part, b + delta * backend.astype(scores >= threshold, delta.dtype))


ARCEE_FUSION = Operator(
    name="arcee_fusion",
    merge=arcee_fusion_merge,
    base="required",
    min_models=1,
    max_models=1,
    summary="Take the other model's changes whose |δ|·KL importance reaches the median + 1.5·IQR fence.",
    paper="https://arcee.ai",
    memory="stream_cuts",
    ignores=("normalize", "int8_mask"),
)
