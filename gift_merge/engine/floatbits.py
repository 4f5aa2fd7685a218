"""Stored float bits ↔ float32 arrays in numpy, rounded exactly as torch rounds them.

numpy has no bfloat16, so bf16 tensors travel as their uint16 bits: widening is a 16-bit shift (exact),
narrowing is round-to-nearest-even on the float32 bits, with every NaN written as 0xFFFF as torch's CPU
conversion does. float16 and float32 use numpy's own IEEE casts, which are torch's too. The numpy merge
path and the torch path therefore write the same bytes (tests/test_numpy_path.py checks it on NaN, ±inf,
subnormals, ties and random values).
"""

from __future__ import annotations

import numpy as np

from gift_merge.dtypes import BFLOAT16, FLOAT16, FLOAT32, FLOAT64, DType

NUMPY_FLOATS = (FLOAT32, FLOAT16, BFLOAT16)
"""The float dtypes the numpy path reads and writes."""

_BF16_NAN = np.uint16(0xFFFF)


def stored_dtype(bits: np.ndarray) -> DType:
    """Which float dtype an array of stored bits holds: uint16 is bfloat16 by the reader's convention."""
    for dtype in NUMPY_FLOATS:
        if bits.dtype == dtype.storage:
            return dtype
    raise ValueError(f"the numpy path does not read {bits.dtype} arrays")


def widen(bits: np.ndarray, dtype: DType) -> np.ndarray:
    """float32 values of stored ``bits`` of ``dtype``; float32 input comes back as is (not a copy)."""
    if dtype == FLOAT32:
        return bits
    if dtype == FLOAT16:
        return bits.astype(np.float32)
    if dtype == BFLOAT16:
        return np.left_shift(bits, 16, dtype=np.uint32).view(np.float32)
    raise ValueError(f"the numpy path cannot widen {dtype}")


def narrow(values: np.ndarray, dtype: DType, out: np.ndarray | None = None) -> np.ndarray:
    """The bits of float32 (or float64) ``values`` rounded to ``dtype`` (into ``out`` if given).

    float64 goes through float32 first, as torch's CPU conversion to float16 and bfloat16 does.
    """
    if dtype == FLOAT64:
        if out is None:
            out = np.empty(values.shape, dtype=np.float64)
        np.copyto(out, values)
        return out
    if values.dtype == np.float64:
        values = values.astype(np.float32)
    if values.dtype != np.float32:
        raise ValueError(f"expected float32 values, got {values.dtype}")
    if out is None:
        out = np.empty(values.shape, dtype=dtype.storage)
    if dtype in (FLOAT32, FLOAT16):
        with np.errstate(over="ignore"):  # beyond float16's range is inf, silently, as in torch
            np.copyto(out, values, casting="same_kind")
        return out
    if dtype != BFLOAT16:
        raise ValueError(f"the numpy path cannot round to {dtype}")
    bits = values.view(np.uint32)
    rounded = np.right_shift(bits, 16)
    rounded &= 1
    rounded += 0x7FFF  # ties to even: add 0x7FFF, plus one more when the kept part is odd
    rounded += bits
    np.right_shift(rounded, 16, out=out, casting="unsafe")
    if values.size and np.isnan(np.max(values)):  # one pass that NaN propagates through; the mask only then
        out[np.isnan(values)] = _BF16_NAN
    return out


def to_math(bits: np.ndarray, stored: DType, math: np.dtype, load: DType | None = None) -> np.ndarray:
    """Stored bits as ``math`` values (float32 or float64), rounded to ``load`` first: the torch path's
    ``tensor.to(load).to(math)``. float64 storage converts directly (one rounding), as ``Tensor.to`` does."""
    if load == FLOAT64 or (stored == FLOAT64 and load is None):  # no rounding: float64 holds every value
        return (bits if stored == FLOAT64 else to_float32(bits, stored)).astype(math, copy=False)
    if stored == FLOAT64 and load is not None:
        return to_float32(narrow(bits, load), load).astype(math, copy=False)
    values = to_float32(bits, stored, load)
    return values.astype(math, copy=False)


def to_float32(bits: np.ndarray, stored: DType, load: DType | None = None) -> np.ndarray:
    """float32 values of stored bits, first rounded to the recipe's ``dtype`` (``load``) as torch does on load."""
    if load is not None and load != stored:
        return widen(narrow(widen(bits, stored), load), load)
    return widen(bits, stored)
