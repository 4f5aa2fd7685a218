"""The array operations merge methods use, on numpy (the CPU) or torch (a GPU): a small namespace of our own.

Every merge method is written once, against :class:`Backend`: arithmetic with Python's operators (``+``,
``*=``, ``>``), which numpy arrays and torch tensors share with the same float32 roundings, and
everything else through the backend's methods. On the CPU the backend is numpy, so a merge never imports
torch; on a GPU it is torch on that device. The CPU backend defines the bytes a merge writes; a GPU run
agrees with it within float32 rounding of its reductions and transcendental functions (tests/test_gpu.py).

Why not the array API standard through ``array-api-compat``: its numpy namespace costs 0.3 s of import
(it pulls in ``numpy.f2py``), as much as a tenth of a whole 0.5B merge, and the standard lacks what the
methods need most (selections with our tie order, the random bits, blocked sums as Python floats,
bfloat16 bits), so a namespace of our own was needed anyway. What each method calls is listed here once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from gift_merge.dtypes import DType
from gift_merge.engine.floatbits import narrow, to_math
from gift_merge.lazy import torch

from .selection import HISTOGRAM_BINS, kth_largest_and_count


@functools.lru_cache(maxsize=4)
def _positions(count: int) -> np.ndarray:
    """0 … count − 1 as uint64, read-only: the blocks of one tensor share it instead of counting again."""
    positions = np.arange(count, dtype=np.uint64)
    positions.flags.writeable = False
    return positions


_UNSIGNED: dict[np.dtype, np.dtype] = {
    np.dtype(np.float32): np.dtype(np.uint32),
    np.dtype(np.float64): np.dtype(np.uint64),
}
"""The unsigned integers float arrays' bits are viewed as for a bitwise select."""


class Backend:
    """What a method may call besides Python's arithmetic operators. Arrays are numpy arrays on the CPU
    backend and torch tensors on a device backend; the host side (random bits, selections) is numpy."""

    name = "numpy"

    # ----------------------------------------------------------------------------------- creation
    def empty(self, count: int, dtype: str = "float32") -> Any:
        return np.empty(count, dtype=dtype)

    def scalar(self, value: float, like: Any) -> Any:
        """``value`` as a 0-d array of ``like``'s dtype: a divisor that must round as an array does."""
        return np.asarray(value, dtype=like.dtype)

    def copy(self, x: Any) -> Any:
        return x.copy()

    def zeros_like(self, x: Any) -> Any:
        return np.zeros_like(x)

    def from_host(self, values: np.ndarray) -> Any:
        """A host (numpy) array on this backend's device: random draws, selected indices."""
        return values

    def to_host(self, values: Any) -> np.ndarray:
        return np.asarray(values)

    # ----------------------------------------------------------------------------------- elementwise
    def abs(self, x: Any, out: Any = None) -> Any:
        return np.abs(x, out=out)

    def sqrt(self, x: Any) -> Any:
        return np.sqrt(x)

    def acos(self, x: Any) -> Any:
        return np.arccos(x)

    def sin(self, x: Any) -> Any:
        return np.sin(x)

    def exp(self, x: Any) -> Any:
        return np.exp(x)

    def log(self, x: Any) -> Any:
        return np.log(x)

    def astype(self, x: Any, dtype: Any) -> Any:
        """``x`` converted to ``dtype`` (a name such as ``"float64"``, or another array's dtype)."""
        return x.astype(dtype)

    def moveaxis(self, x: Any, source: int, destination: int) -> Any:
        return np.moveaxis(x, source, destination)

    def copysign(self, magnitude: float, sign: Any) -> Any:
        """``magnitude`` with the sign of each entry of ``sign`` (−0 counts as negative)."""
        return np.copysign(sign.dtype.type(magnitude), sign)

    def positive(self, x: Any) -> Any:
        """``x > 0`` as a bool mask."""
        return np.greater(x, 0)

    def sign(self, x: Any) -> Any:
        return np.sign(x)

    def clip(self, x: Any, low: float | None, high: float | None) -> Any:
        return np.clip(x, low, high)

    def maximum(self, x: Any, floor: float) -> Any:
        return np.maximum(x, floor)

    def where(self, mask: Any, a: Any, b: Any) -> Any:
        """``np.where``'s values, formed on the bits when ``a`` is a float array and ``b`` one of its shape and
        dtype or a number: ``a & M | b & ~M`` with M all ones where ``mask`` holds. A random mask makes
        ``np.where`` branch per entry (4–6 ns per float32 entry against 0.25 ns on a 2-core EPYC)."""
        unsigned = _UNSIGNED.get(a.dtype) if isinstance(a, np.ndarray) else None
        if unsigned is None or not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.shape != a.shape:
            return np.where(mask, a, b)
        if isinstance(b, np.ndarray):
            if b.dtype != a.dtype or b.shape != a.shape:
                return np.where(mask, a, b)
        elif isinstance(b, (int, float)):
            b = np.array(b, dtype=a.dtype)  # the rounding np.where gives a Python number next to a's dtype
        else:
            return np.where(mask, a, b)
        ones = np.negative(mask.astype(unsigned))  # 1 → all ones, 0 → 0 (unsigned wrap-around)
        bits = a.view(unsigned) & ones
        if b.view(unsigned).any():  # +0.0 has no bits to add
            bits |= b.view(unsigned) & ~ones
        return bits.view(a.dtype)

    # ----------------------------------------------------------------------------------- reductions
    def total(self, x: Any) -> float:
        """Σ x over all entries in x's own dtype, as a Python float: numpy's pairwise summation."""
        return float(np.add.reduce(x, axis=None))

    def row_sums(self, x: Any) -> Any:
        """Sums along the last axis, keeping it: shape (..., 1)."""
        return np.add.reduce(x, axis=-1, keepdims=True)

    def row_max(self, x: Any) -> Any:
        """Maxima along the last axis, keeping it: shape (..., 1)."""
        return np.max(x, axis=-1, keepdims=True)

    def count(self, mask: Any) -> int:
        """How many entries are non-zero."""
        return int(np.count_nonzero(mask))

    def mean64(self, x: Any) -> float:
        """The mean of all entries, accumulated in float64."""
        return float(np.mean(x, dtype=np.float64))

    # ----------------------------------------------------------------------------------- selection
    def kth_largest_and_count(self, values: Any, k: int, *, in_place: bool = False) -> tuple[Any, int]:
        """The k-th largest entry of a flat array and how many entries exceed it: a guess from a sample,
        proved by counting, else introselect (never a sort)."""
        return kth_largest_and_count(values, k, in_place=in_place)

    def bit_histogram(self, values: Any, high: int | None) -> np.ndarray:
        """Counts (host int64, 2¹⁶ bins) of the high 16 bits of non-negative float32 values' bit patterns, or
        with ``high`` given, of the low 16 bits of the values whose high 16 bits are ``high``: one pass of
        :func:`~gift_merge.engine.selection.streamed_kth_largest`."""
        bits = values.view(np.uint32)
        top = bits >> np.uint32(16)
        if high is None:
            return np.bincount(top, minlength=HISTOGRAM_BINS)
        return np.bincount(bits[top == high] & np.uint32(0xFFFF), minlength=HISTOGRAM_BINS)

    def flatnonzero(self, mask: Any) -> Any:
        """Indices of the true entries of a flat mask, ascending."""
        return np.flatnonzero(mask)

    def row_order(self, rows: Any) -> Any:
        """Each row's entries in ascending order of its non-negative values, equal values by index (a stable
        argsort of every row of a 2-D array), as flat positions in ``rows``: ``flat[order]`` reads the rows
        sorted and ``flat[order] = v`` writes back, both plain indexing.

        float32 values ≥ 0 order like their bit patterns, so (bits << 32 | flat position) is a unique uint64
        key in the stable order, and numpy's SIMD sort of plain integers beats a stable float argsort several
        times over; float64 rows take the stable argsort."""
        count, width = rows.shape
        if rows.dtype != np.float32:
            order = np.argsort(rows, axis=1, kind="stable")
            order += np.arange(0, count * width, width)[:, None]
            return order
        if count * width >= 1 << 32:
            raise ValueError(f"row_order ranks below 2³² entries at once, got {count} × {width}")
        keys = rows.view(np.uint32).astype(np.uint64)
        keys <<= np.uint64(32)
        keys |= _positions(count * width).reshape(count, width)
        keys.sort(axis=1)
        keys &= np.uint64(0xFFFFFFFF)  # the positions, in place: below 2³², so their int64 view is the same number
        return keys.view(np.int64)

    # ----------------------------------------------------------------------------------- linear algebra
    # Inputs are made C-contiguous first, so the BLAS/LAPACK call (and its bits) does not depend on how an
    # operand happens to be laid out: the torch backend on the CPU hands its tensors' numpy views here.
    def matmul(self, a: Any, b: Any) -> Any:
        """The matrix product ``a @ b`` of two 2-D arrays."""
        return np.matmul(np.ascontiguousarray(a), np.ascontiguousarray(b))

    def svd(self, x: Any) -> tuple[Any, Any, Any]:
        """The thin SVD of a 2-D array: ``U`` (m, r), ``S`` (r,) descending, ``Vh`` (r, n), r = min(m, n)."""
        u, s, vh = np.linalg.svd(np.ascontiguousarray(x), full_matrices=False)
        return u, s, vh

    def qr(self, x: Any) -> Any:
        """``Q`` of the reduced QR of a 2-D array: an orthonormal basis of its columns' span (m ≥ n)."""
        return np.linalg.qr(np.ascontiguousarray(x), mode="reduced")[0]

    def gram(self, x: Any) -> Any:
        """``xᵀx`` of a 2-D array in float64 (n, n): products of float32 entries are exact in float64, and
        BLAS's symmetric rank-k update does half a general product's work."""
        block = np.ascontiguousarray(x, dtype=np.float64)
        return block.T @ block

    def eigh(self, x: Any) -> tuple[Any, Any]:
        """Eigenvalues of a symmetric 2-D array in descending order, and its eigenvectors as columns."""
        values, vectors = np.linalg.eigh(np.ascontiguousarray(x))
        return values[::-1].copy(), vectors[:, ::-1].copy()

    def concat(self, arrays: list[Any], axis: int) -> Any:
        return np.concatenate(arrays, axis=axis)

    # ----------------------------------------------------------------------------------- storage
    def widen(self, bits: Any, stored: DType, math: DType, load: DType | None) -> Any:
        """Stored values in ``math``, rounded to the recipe's ``load`` dtype first; the caller picks ``math``
        (float64 wherever the values are float64, :class:`~gift_merge.engine.sources.StoredSource`)."""
        return to_math(bits, stored, np.dtype(math.name), load)

    def output(self, count: int, dtype: DType) -> Any:
        """A flat buffer for ``count`` entries of ``dtype``, as stored (bfloat16 as its uint16 bits)."""
        return np.empty(count, dtype=dtype.storage)

    def store(self, values: Any, dtype: DType, out: Any) -> None:
        """Round math-dtype ``values`` to ``dtype`` into ``out`` (a slice of :meth:`output`)."""
        narrow(values, dtype, out)

    def to_writer(self, values: Any) -> Any:
        """A finished output buffer as the writer takes it: in host memory."""
        return values


@dataclass(frozen=True)
class TorchBackend(Backend):
    """:class:`Backend` on a torch device (a GPU).

    On the CPU (tests, ``--engine torch``) its sums, square roots and selections are numpy's, as the numpy
    backend's: torch's CPU float32 ``sqrt`` is not correctly rounded (one result in five was 1 ulp off)
    and its sums are ordered differently, so this keeps a CPU run byte-identical whichever backend runs it.
    """

    device: Any = "cpu"
    name = "torch"

    @property
    def on_cpu(self) -> bool:
        return str(self.device) == "cpu"

    def empty(self, count: int, dtype: str = "float32") -> Any:
        return torch.empty(count, dtype=getattr(torch, "bool" if dtype == "bool" else dtype), device=self.device)

    def scalar(self, value: float, like: Any) -> Any:
        return torch.tensor(value, dtype=like.dtype, device=like.device)

    def copy(self, x: Any) -> Any:
        return x.clone()

    def zeros_like(self, x: Any) -> Any:
        return torch.zeros_like(x)

    def from_host(self, values: np.ndarray) -> Any:
        return torch.from_numpy(np.ascontiguousarray(values)).to(self.device)

    def to_host(self, values: Any) -> np.ndarray:
        return values.detach().cpu().numpy()

    def abs(self, x: Any, out: Any = None) -> Any:
        return torch.abs(x, out=out)

    def sqrt(self, x: Any) -> Any:
        return torch.from_numpy(np.sqrt(x.numpy())) if self.on_cpu else torch.sqrt(x)

    def acos(self, x: Any) -> Any:
        return torch.from_numpy(np.arccos(x.numpy())) if self.on_cpu else torch.acos(x)

    def sin(self, x: Any) -> Any:
        return torch.from_numpy(np.sin(x.numpy())) if self.on_cpu else torch.sin(x)

    def exp(self, x: Any) -> Any:
        return torch.from_numpy(np.exp(x.numpy())) if self.on_cpu else torch.exp(x)

    def log(self, x: Any) -> Any:
        return torch.from_numpy(np.log(x.numpy())) if self.on_cpu else torch.log(x)

    def astype(self, x: Any, dtype: Any) -> Any:
        return x.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)

    def moveaxis(self, x: Any, source: int, destination: int) -> Any:
        return torch.movedim(x, source, destination)

    def copysign(self, magnitude: float, sign: Any) -> Any:
        return torch.copysign(torch.tensor(magnitude, dtype=sign.dtype, device=sign.device), sign)

    def positive(self, x: Any) -> Any:
        return x > 0

    def sign(self, x: Any) -> Any:
        return torch.sign(x)

    def clip(self, x: Any, low: float | None, high: float | None) -> Any:
        return torch.clamp(x, low, high)

    def maximum(self, x: Any, floor: float) -> Any:
        return torch.clamp(x, min=floor)

    def where(self, mask: Any, a: Any, b: Any) -> Any:
        return torch.where(mask, a, b)

    def total(self, x: Any) -> float:
        return super().total(x.numpy()) if self.on_cpu else float(x.sum())

    def row_sums(self, x: Any) -> Any:
        return torch.from_numpy(super().row_sums(x.numpy())) if self.on_cpu else x.sum(dim=-1, keepdim=True)

    def row_max(self, x: Any) -> Any:
        return torch.amax(x, dim=-1, keepdim=True)

    def count(self, mask: Any) -> int:
        return int(torch.count_nonzero(mask))

    def mean64(self, x: Any) -> float:
        return float(x.mean(dtype=torch.float64))

    def kth_largest_and_count(self, values: Any, k: int, *, in_place: bool = False) -> tuple[Any, int]:
        if self.on_cpu:
            value, above = super().kth_largest_and_count(values.numpy(), k, in_place=in_place)
            return torch.tensor(value, dtype=values.dtype), above
        value = torch.kthvalue(values, values.numel() - k + 1).values
        return value, int(torch.count_nonzero(values > value))

    def bit_histogram(self, values: Any, high: int | None) -> np.ndarray:
        if self.on_cpu:
            return super().bit_histogram(values.numpy(), high)
        bits = values.view(torch.int32)  # non-negative values: the sign bit is clear
        top = bits >> 16
        picked = top if high is None else bits[top == high] & 0xFFFF
        return torch.bincount(picked, minlength=HISTOGRAM_BINS).cpu().numpy()

    def row_order(self, rows: Any) -> Any:
        if self.on_cpu:
            return torch.from_numpy(super().row_order(rows.numpy()))
        count, width = rows.shape
        offsets = torch.arange(0, count * width, width, device=rows.device)[:, None]
        return torch.argsort(rows, dim=1, stable=True) + offsets

    def flatnonzero(self, mask: Any) -> Any:
        if self.on_cpu:  # numpy's is ~5× faster than torch.nonzero on the CPU
            return torch.from_numpy(np.flatnonzero(mask.numpy()))
        return torch.nonzero(mask).squeeze(1)

    def matmul(self, a: Any, b: Any) -> Any:
        return torch.from_numpy(super().matmul(a.numpy(), b.numpy())) if self.on_cpu else a @ b

    def svd(self, x: Any) -> tuple[Any, Any, Any]:
        if self.on_cpu:  # LAPACK through numpy, as the numpy backend: the same bits
            u, s, vh = super().svd(x.numpy())
            return torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(vh)
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        return u, s, vh

    def qr(self, x: Any) -> Any:
        return torch.from_numpy(super().qr(x.numpy())) if self.on_cpu else torch.linalg.qr(x).Q

    def gram(self, x: Any) -> Any:
        if self.on_cpu:
            return torch.from_numpy(super().gram(x.numpy()))
        block = x.to(torch.float64)
        return block.T @ block

    def eigh(self, x: Any) -> tuple[Any, Any]:
        if self.on_cpu:
            values, vectors = super().eigh(x.numpy())
            return torch.from_numpy(values), torch.from_numpy(vectors)
        values, vectors = torch.linalg.eigh(x)
        return torch.flip(values, (0,)), torch.flip(vectors, (1,))

    def concat(self, arrays: list[Any], axis: int) -> Any:
        return torch.cat(arrays, dim=axis)

    def widen(self, bits: Any, stored: DType, math: DType, load: DType | None) -> Any:
        tensor = bits.to(self.device)
        if load is not None:
            tensor = tensor.to(load.torch)
        return tensor.to(math.torch)  # the caller's math dtype is float64 for float64 values already

    def output(self, count: int, dtype: DType) -> Any:
        return torch.empty(count, dtype=dtype.torch, device=self.device)

    def store(self, values: Any, dtype: DType, out: Any) -> None:
        out.copy_(values)

    def to_writer(self, values: Any) -> Any:
        return values.cpu()


NUMPY = Backend()
"""The CPU backend: every merge on the CPU runs on it, without torch."""
