"""Counting NaN and ±inf in a tensor's stored bits, for every output tensor the writer receives.

A NaN in one input tensor used to merge silently into an all-NaN output tensor, and a finite fp32
result that overflows fp16 becomes inf without a word. Reading the bits (an all-ones exponent) works for
every float format the writer stores, bf16 included, without converting anything, on blocks small enough
to stay in cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gift_merge.dtypes import DType

# stored width → (exponent mask, mantissa mask) of the IEEE-style formats the writer stores
_MASKS: dict[str, tuple[np.dtype, int, int]] = {
    "F64": (np.dtype(np.uint64), 0x7FF0000000000000, 0x000FFFFFFFFFFFFF),
    "F32": (np.dtype(np.uint32), 0x7F800000, 0x007FFFFF),
    "F16": (np.dtype(np.uint16), 0x7C00, 0x03FF),
    "BF16": (np.dtype(np.uint16), 0x7F80, 0x007F),
}
BLOCK = 1 << 18  # entries per pass: the temporaries stay in cache


@dataclass(frozen=True)
class NonFinite:
    nan: int
    inf: int

    def __str__(self) -> str:
        parts = [f"{self.nan} NaN" if self.nan else "", f"{self.inf} ±inf" if self.inf else ""]
        return " and ".join(p for p in parts if p)


def count_nonfinite(data: np.ndarray, dtype: DType) -> NonFinite | None:
    """NaN and ±inf among ``data`` (the tensor's bytes, any shape, as uint8), or None when all are finite.

    Formats without infinities (integers, fp8 e4m3) are not counted.
    """
    if dtype.code not in _MASKS:
        return None
    width, exponent, mantissa = _MASKS[dtype.code]
    bits = data.reshape(-1).view(width)
    exponent_bits = width.type(exponent)
    nan = inf = 0
    for start in range(0, bits.size, BLOCK):
        block = bits[start : start + BLOCK]
        special = (block & exponent_bits) == exponent_bits
        count = int(np.count_nonzero(special))
        if count:
            nans = int(np.count_nonzero(block[special] & width.type(mantissa)))
            nan += nans
            inf += count - nans
    return NonFinite(nan, inf) if nan or inf else None
