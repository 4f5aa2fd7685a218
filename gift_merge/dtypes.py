"""Tensor element types, known without importing torch.

Planning a merge needs only each tensor's dtype name and size (from the safetensors header), and the
numpy merge path never touches torch at all, so the plan speaks :class:`DType`; the torch path converts
with :attr:`DType.torch` where it computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gift_merge.errors import GiftMergeError
from gift_merge.lazy import torch as _torch


@dataclass(frozen=True)
class DType:
    """One element type: torch's name for it, safetensors' code and its size in bytes."""

    name: str
    code: str
    itemsize: int
    is_floating_point: bool = True

    @property
    def torch(self) -> _torch.dtype:
        return getattr(_torch, self.name)

    @property
    def storage(self) -> np.dtype:
        """The numpy dtype that holds this dtype's bits: itself where numpy has it, else an unsigned
        integer of the same width (bf16 → uint16), whose bits the numpy path converts by hand."""
        return np.dtype(_NUMPY_STORAGE.get(self.name, self.name))

    def __str__(self) -> str:
        return self.name


_NUMPY_STORAGE = {"bfloat16": "uint16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8"}


FLOAT64 = DType("float64", "F64", 8)
FLOAT32 = DType("float32", "F32", 4)
FLOAT16 = DType("float16", "F16", 2)
BFLOAT16 = DType("bfloat16", "BF16", 2)
FLOAT8_E4M3 = DType("float8_e4m3fn", "F8_E4M3", 1)
FLOAT8_E5M2 = DType("float8_e5m2", "F8_E5M2", 1)
INT64 = DType("int64", "I64", 8, False)
INT32 = DType("int32", "I32", 4, False)
INT16 = DType("int16", "I16", 2, False)
INT8 = DType("int8", "I8", 1, False)
UINT8 = DType("uint8", "U8", 1, False)
BOOL = DType("bool", "BOOL", 1, False)

BY_CODE: dict[str, DType] = {
    d.code: d
    for d in (FLOAT64, FLOAT32, FLOAT16, BFLOAT16, FLOAT8_E4M3, FLOAT8_E5M2, INT64, INT32, INT16, INT8, UINT8, BOOL)
}
"""Every dtype a safetensors header may name that gift-merge reads, by its header code."""

_BY_NAME = {d.name: d for d in BY_CODE.values()}

_SPELLINGS: dict[str, DType] = {
    "float32": FLOAT32,
    "fp32": FLOAT32,
    "float": FLOAT32,
    "float16": FLOAT16,
    "fp16": FLOAT16,
    "half": FLOAT16,
    "bfloat16": BFLOAT16,
    "bf16": BFLOAT16,
    "float64": FLOAT64,
    "fp64": FLOAT64,
}


def parse_dtype(name: str, where: str) -> DType:
    """``bfloat16``, ``torch.float16``, ``fp32`` … → a dtype, or an error naming ``where``."""
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in _SPELLINGS:
        raise GiftMergeError(f"{where}: unknown dtype {name!r} (use float32, bfloat16 or float16)")
    return _SPELLINGS[key]


def of(dtype: Any) -> DType:
    """The :class:`DType` of a torch dtype (or of a DType: itself)."""
    if isinstance(dtype, DType):
        return dtype
    return _BY_NAME[str(dtype).removeprefix("torch.")]


def dtype_name(dtype: Any) -> str:
    """``bfloat16`` for a DType or a torch dtype alike."""
    return str(dtype).removeprefix("torch.")
