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

Exactly one model besides the base, as in mergekit. The quantiles are mergekit's: the lower order
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

Two passes: the importances into a tensor-sized buffer (per row of whole rows, the KL kept per row) and
the three order statistics; then the masked mix, the importance recomputed from the same bits.
"""

from __future__ import annotations

from typing import Any

from . import base as base_module
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
    return backend.row_sums(p * backend.log(p / q))


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
    parts = list(operands.chunks(max(1, base_module.CHUNK // width) * width))  # whole rows

    importance: Any = None
    kls = []
    for part in parts:  # first pass: the importances and each row's KL
        theta, b = other.read(part), base.read(part)
        kl = backend.astype(row_kl(backend, theta.reshape(-1, width), b.reshape(-1, width)), theta.dtype)
        kls.append(kl)
        if importance is None:
            importance = backend.empty(count, _dtype_name(theta))
        importance[part] = (backend.abs(theta - b).reshape(-1, width) * kl).reshape(-1)

    last = count - 1  # ascending index i is the (N − i)-th largest; the selections may reorder the buffer
    q1, median, q3 = (
        backend.kth_largest_and_count(importance, count - index, in_place=True)[0]
        for index in (last // 4, last // 2, 3 * last // 4)
    )
    threshold = median + (q3 - q1) * FENCE  # in the compute dtype, as mergekit's tensors
    del importance

    for part, kl in zip(parts, kls, strict=True):  # second pass: the same importances, masked
        theta, b = other.read(part), base.read(part)
        delta = theta - b
        keep = (backend.abs(delta).reshape(-1, width) * kl).reshape(-1) >= threshold
        operands.out.write(part, b + delta * backend.astype(keep, delta.dtype))


ARCEE_FUSION = Operator(
    name="arcee_fusion",
    merge=arcee_fusion_merge,
    base="required",
    min_models=1,
    max_models=1,
    summary="Take the other model's changes whose |δ|·KL importance reaches the median + 1.5·IQR fence.",
    paper="https://arcee.ai",
    memory="cuts",
)
