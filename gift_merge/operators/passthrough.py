"""Passthrough: copy the single input tensor, optionally scaled.

    θ = s · θ_1        (s = ``scale``, default 1)

No paper: this is how layer-stacking ("frankenmerge") recipes copy slices of one model unchanged, and
``scale: 0`` on a filter zeroes chosen tensors. mergekit's default for ``scale`` is "unset"; 1.0 is the
same result.
"""

from __future__ import annotations

from typing import Any

from .base import MergeInputs, Operator, Param, elementwise
from .checks import finite


def passthrough_merge(inputs: MergeInputs[Any]) -> Any:
    """Always a new tensor, never the input itself: the executor may hand the input to other jobs.
    Tensor or numpy array alike (see ``linear_merge``)."""
    return inputs.tensors[0] * float(inputs.model_params[0]["scale"])


PASSTHROUGH = Operator(
    name="passthrough",
    merge=elementwise(passthrough_merge),
    params=(Param("scale", 1.0, per_model=True, doc="Multiplier for the tensor.", check=finite("scale")),),
    base="ignored",
    min_models=1,
    max_models=1,
    summary="Copy one model's tensor, optionally scaled.",
    elementwise=True,
)
