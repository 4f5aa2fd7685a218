"""NearSwap: take the other model's value only where it is already near the base.

    w = clamp(t / max(|θ_b − θ_1|, 1e-6), 0, 1)
    θ = w·θ_1 + (1 − w)·θ_b

Entries closer than t move fully to θ_1; farther ones move a fraction t/|θ_b − θ_1| of the way, so the
base's large differences survive. t = 0 gives the base; a negative t, which mergekit silently treats
as 0, is rejected. No paper; introduced with
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001
"""

from __future__ import annotations

from typing import Any

from .base import MergeInputs, Operator, Param, elementwise
from .checks import interval


def nearswap_mix(inputs: MergeInputs[Any]) -> Any:
    base, other = inputs.base, inputs.tensors[0]
    if base is None:
        raise ValueError("nearswap needs a base tensor")
    backend = inputs.backend
    # t as an array, not a Python float: torch computes float / tensor as t · (1/x), two roundings
    t = backend.scalar(float(inputs.params["t"]), base)
    weight = backend.clip(t / backend.maximum(backend.abs(base - other), 1e-6), 0, 1)
    return weight * other + (1 - weight) * base


NEARSWAP = Operator(
    name="nearswap",
    merge=elementwise(nearswap_mix),
    params=(
        Param(
            "t",
            doc="Distance below which an entry is swapped to the other model.",
            check=interval("t", 0.0, float("inf")),
        ),
    ),
    base="required",
    min_models=1,
    max_models=1,
    summary="Move the base towards the other model only where the two are close.",
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    elementwise=True,
)
