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
from typing import Any

from .base import Operands, Operator, Param
from .checks import fixed
from .gta import NO_CUT, gta_merge, gta_params


def _no_op_only(params: tuple[Param, ...], reason: str) -> tuple[Param, ...]:
    """``density`` and ``rescale`` restricted to the values that do nothing."""
    no_op = {"density": 1.0, "rescale": False}
    return tuple(replace(p, check=fixed(p.name, no_op[p.name], reason)) if p.name in no_op else p for p in params)


def task_arithmetic_merge(operands: Operands[Any]) -> None:
    gta_merge(operands, NO_CUT, consensus=False)


TASK_ARITHMETIC = Operator(
    name="task_arithmetic",
    merge=task_arithmetic_merge,
    params=_no_op_only(gta_params(normalize=False, rescale=False), "task_arithmetic prunes nothing"),
    base="required",
    summary="Base plus the weighted sum of task vectors.",
    paper="https://arxiv.org/abs/2212.04089",
    elementwise=True,
)
