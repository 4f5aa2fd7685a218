"""NearSwap: take the other model's value only where it is already near the base.

    w = clamp(t / max(|θ_b − θ_1|, 1e-6), 0, 1)
    θ = w·θ_1 + (1 − w)·θ_b

Entries closer than t move fully to θ_1; farther ones move a fraction t/|θ_b − θ_1| of the way, so the
base's large differences survive. t = 0 gives the base; a negative t, which mergekit silently treats
as 0, is rejected. No paper; introduced with
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001
"""

from __future__ import annotations

import numpy as np

from gift_merge.lazy import torch

from .base import MergeInputs, Operator, Param
from .checks import interval


def nearswap_merge(inputs: MergeInputs) -> torch.Tensor:
    base, other = inputs.base, inputs.tensors[0]
    if base is None:
        raise ValueError("nearswap needs a base tensor")
    t = torch.tensor(float(inputs.params["t"]), dtype=base.dtype, device=base.device)
    # a 0-d tensor, not a Python float: torch computes float / tensor as t · (1/x), two roundings
    weight = torch.div(t, (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * other + (1 - weight) * base


def nearswap_numpy(inputs: MergeInputs[np.ndarray]) -> np.ndarray:
    """:func:`nearswap_merge` in numpy, the same operations in the same order."""
    base, other = inputs.base, inputs.tensors[0]
    if base is None:
        raise ValueError("nearswap needs a base tensor")
    t = float(inputs.params["t"])
    weight = np.clip(t / np.maximum(np.abs(base - other), 1e-6), 0, 1)
    return weight * other + (1 - weight) * base


NEARSWAP = Operator(
    name="nearswap",
    apply=nearswap_merge,
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
    numpy=nearswap_numpy,
)
