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
"""

from __future__ import annotations

from gift_merge.lazy import torch

from .base import MergeInputs, Operator, Param
from .checks import INT8_MASK, interval
from .kernels import disjoint_sum, elect_signs, sign_masks, task_vectors, topk_mask


def sce_merge(inputs: MergeInputs) -> torch.Tensor:
    base = inputs.base
    if base is None:
        raise ValueError("sce needs a base tensor")
    taus = task_vectors(inputs.tensors, base)
    n = len(taus)
    select_topk = float(inputs.params["select_topk"])
    if select_topk < 1:
        mean = sum(taus[1:], taus[0].clone()) / n
        var = sum(((t - mean) ** 2 for t in taus), torch.zeros_like(mean)) / n  # population variance
        keep = topk_mask(var, int(int(torch.count_nonzero(var)) * select_topk))
        taus = [torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device)) for t in taus]

    energy = [float(t.pow(2).mean(dtype=torch.float64)) for t in taus]
    total = sum(energy)
    omega = [e / total for e in energy] if total > 0 else [1.0 / n] * n

    masks = sign_masks(taus, elect_signs(taus))
    mixed, divisor = disjoint_sum([t * w for t, w in zip(taus, omega, strict=True)], omega, masks)
    return base + mixed / divisor


SCE = Operator(
    name="sce",
    apply=sce_merge,
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
)
