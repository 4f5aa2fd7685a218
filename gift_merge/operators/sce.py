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
is written here. The tensor is read whole: the variance selection and the energies span all of it.
"""

from __future__ import annotations

from typing import Any

from .base import Operands, Operator, Param
from .checks import INT8_MASK, interval
from .selection import top_k


def sce_merge(operands: Operands[Any]) -> None:
    if operands.base is None:
        raise ValueError("sce needs a base tensor")
    backend, whole = operands.backend, slice(0, operands.numel)
    base = operands.base.read(whole)
    taus = [source.read(whole) - base for source in operands.sources]
    n = len(taus)
    select_topk = float(operands.params["select_topk"])
    if select_topk < 1:  # select
        mean = sum(taus[1:], backend.copy(taus[0])) / n
        var = sum(((t - mean) ** 2 for t in taus), backend.zeros_like(mean)) / n  # population variance
        keep = top_k(backend, var, int(backend.count(var) * select_topk))
        taus = [backend.where(keep, t, 0.0) for t in taus]

    energy = [backend.mean64(t**2) for t in taus]  # calculate
    total = sum(energy)
    omega = [e / total for e in energy] if total > 0 else [1.0 / n] * n

    sum_of_taus = backend.copy(taus[0])  # erase: σ = +1 where Σ τ_i ≥ 0, m_i = [sign τ_i = σ]
    for tau in taus[1:]:
        sum_of_taus += tau
    sigma = backend.where(sum_of_taus >= 0, 1.0, -1.0)
    mixed, divisor = backend.zeros_like(base), backend.zeros_like(base)
    for tau, weight in zip(taus, omega, strict=True):
        agrees = backend.sign(tau) == sigma
        mixed += backend.where(agrees, tau * weight, 0.0)
        divisor += backend.astype(agrees, divisor.dtype) * weight
    divisor[divisor == 0] = 1
    operands.out.write(whole, base + mixed / divisor)


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
    memory="whole",
)
