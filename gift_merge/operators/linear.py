"""Linear merge (model soup): a weighted average of the inputs.

    θ = Σ_i w_i θ_i / Σ_i w_i      (normalize: true, the default)
    θ = Σ_i w_i θ_i                (normalize: false)

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
increasing inference time", https://arxiv.org/abs/2203.05482

There is no separate base: a base model listed under ``models`` is one more weighted input. Deviation:
with normalize on and weights that sum to 0 mergekit divides by zero and writes inf/NaN; here the
parameter check rejects the combination before any tensor is read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .base import MergeInputs, Operator, Param, elementwise
from .checks import WEIGHT


def check_linear(params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]) -> str | None:
    """Normalizing by a zero weight sum is undefined."""
    total = sum(float(mp["weight"]) for mp in model_params)
    if params["normalize"] and abs(total) < 1e-8:
        return f"weight values sum to {total}, so normalize: true would divide by zero; change the weights"
    return None


def linear_merge(inputs: MergeInputs[Any]) -> Any:
    """Written with operators torch tensors and numpy arrays share (a Python float scales in float32 in
    both), so this one function serves every backend."""
    weights = [float(mp["weight"]) for mp in inputs.model_params]
    out = inputs.tensors[0] * weights[0]
    for tensor, weight in zip(inputs.tensors[1:], weights[1:], strict=True):
        out += tensor * weight
    if inputs.params["normalize"]:
        out /= sum(weights)
    return out


LINEAR = Operator(
    name="linear",
    merge=elementwise(linear_merge),
    params=(
        WEIGHT,
        Param("normalize", True, kind=bool, doc="Divide by the sum of the weights."),
    ),
    base="ignored",
    summary="Weighted average of the inputs.",
    paper="https://arxiv.org/abs/2203.05482",
    check=check_linear,
    elementwise=True,
)
