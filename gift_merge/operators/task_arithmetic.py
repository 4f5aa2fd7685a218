"""Task arithmetic: add weighted task vectors to the base.

    θ = θ_b + λ · Σ_i w_i (θ_i − θ_b)            (normalize: false, the default)
    θ = θ_b + λ · Σ_i w_i (θ_i − θ_b) / Σ_i w_i   (normalize: true; a weight sum below 1e-8 counts as 1)

Ilharco et al., "Editing Models with Task Arithmetic", https://arxiv.org/abs/2212.04089

mergekit declares ``density`` and ``rescale`` for every GTA method but ignores them here, since task
arithmetic prunes nothing. They are accepted only at their no-op values (density 1, rescale false), so a
recipe that expects pruning fails loudly instead of being silently ignored.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from gift_merge.lazy import torch

from .base import MergeInputs, Operator, Param
from .checks import fixed
from .gta import gta_merge, gta_params


def _no_op_only(params: tuple[Param, ...], reason: str) -> tuple[Param, ...]:
    """``density`` and ``rescale`` restricted to the values that do nothing."""
    no_op = {"density": 1.0, "rescale": False}
    return tuple(replace(p, check=fixed(p.name, no_op[p.name], reason)) if p.name in no_op else p for p in params)


def task_arithmetic_merge(inputs: MergeInputs[torch.Tensor]) -> torch.Tensor:
    return gta_merge(inputs, sparsify=None, consensus=False)


def task_arithmetic_numpy(inputs: MergeInputs[np.ndarray]) -> np.ndarray:
    """``gta_merge`` without sparsifier or consensus, step for step: (θ_i − θ_b)·w_i summed in input
    order, divided by the weight sum, times λ, plus θ_b; each step rounded to float32 as torch does."""
    base = inputs.base
    if base is None:
        raise ValueError("task arithmetic needs a base tensor")
    weights = [float(mp["weight"]) for mp in inputs.model_params]
    weighted = [np.subtract(t, base) for t in inputs.tensors]
    for delta, weight in zip(weighted, weights, strict=True):
        delta *= weight
    mixed = weighted[0]
    for delta in weighted[1:]:
        mixed += delta
    if inputs.params["normalize"]:
        total = sum(weights)
        mixed /= total if abs(total) >= 1e-8 else 1.0
    lam = float(inputs.params["lambda"])
    if lam != 1:
        mixed *= lam
    mixed += base
    return mixed


TASK_ARITHMETIC = Operator(
    name="task_arithmetic",
    apply=task_arithmetic_merge,
    params=_no_op_only(gta_params(normalize=False, rescale=False), "task_arithmetic prunes nothing"),
    base="required",
    summary="Base plus the weighted sum of task vectors.",
    paper="https://arxiv.org/abs/2212.04089",
    elementwise=True,
    numpy=task_arithmetic_numpy,
)
