"""Dtype names as recipes and the CLI spell them."""

from __future__ import annotations

import torch

from gift_merge.errors import GiftMergeError

_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def parse_dtype(name: str, where: str) -> torch.dtype:
    """``bfloat16``, ``torch.float16``, ``fp32`` … → a torch dtype, or an error naming ``where``."""
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in _NAMES:
        raise GiftMergeError(f"{where}: unknown dtype {name!r} (use float32, bfloat16 or float16)")
    return _NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
