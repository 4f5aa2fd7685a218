"""NuSLERP: spherical interpolation of two models with weights, optionally of their task vectors.

    t = w_2/(w_1 + w_2)             (t = ½ when |w_1 + w_2| < 1e-6, as in mergekit)
    with a base:     θ = θ_b + slerp_t(θ_1 − θ_b, θ_2 − θ_b)
    without a base:  θ = slerp_t(θ_1, θ_2)
    slerp_t(a, b) = (sin((1 − t)Ω)·a + sin(tΩ)·b)/sin Ω,   Ω = arccos⟨a/‖a‖, b/‖b‖⟩
                    (norms clamped at 1e-7; where |sin Ω| < 1e-8: (1 − t)·a + t·b)

``nuslerp_flatten`` (default true) treats the tensor as one vector. With it false the interpolation is
done per vector: ``nuslerp_row_wise: false`` (default) takes vectors along the last dimension (each row
W[i, :] of an [out, in] matrix), ``true`` along dim 0 (each column W[:, j]). This is what mergekit's code
does; its docs describe the two the other way round.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985,
https://doi.org/10.1145/325165.325242 (mergekit names no paper for nuslerp).
The per-vector angle is computed in float64, so exactly antiparallel vectors take the lerp branch instead
of dividing by the float32 rounding residue of sin π; ‖a‖², ‖b‖² and ⟨a, b⟩ stay in the math dtype.

The inputs stream, in slices, whatever the vectors are:
- one vector (flatten, a 1-D tensor, or columns of a one-column tensor): ‖a‖², ‖b‖², ⟨a, b⟩ are blocked sums
  (:mod:`reductions`) in a first pass, rounded to the math dtype, then the interpolation in a second. (Before
  streaming, these were one pairwise sum over the whole tensor: the same bits within one summation block,
  65,536 entries; beyond it a sum may differ in its last place, and so a coefficient.)
- rows (``nuslerp_row_wise: false``): blocks of whole rows, each block alone in one pass: the same bits as
  the whole tensor, as each row's sums and angle are its own.
- columns (``nuslerp_row_wise: true``): the per-column sums are carried across blocks of dim-0 rows, added
  row by row in row order as numpy sums a column of the whole tensor (so the same bits), then the
  interpolation over the same blocks. Memory: three sums per column.
A slice holds at least one row, so a row (or for columns, a dim-0 row) wider than a slice is read whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from . import base as contract  # CHUNK, read when a merge runs
from .base import Operands, Operator, Param
from .checks import WEIGHT
from .reductions import blocks

if TYPE_CHECKING:
    from gift_merge.engine.backend import Backend


def coefficients(backend: Backend, t: float, sums: Sequence[Any], dtype: Any, eps: float = 1e-8) -> tuple[Any, Any]:
    """(c0, c1) with slerp_t(a, b) = c0·a + c1·b for each vector, from its ``sums`` ‖a‖², ‖b‖², ⟨a, b⟩ (arrays
    of one entry per vector, in the math dtype); the angle in float64, the coefficients in ``dtype``."""
    norm0_sq, norm1_sq, dot = sums
    n0 = backend.maximum(backend.sqrt(norm0_sq), 1e-7)
    n1 = backend.maximum(backend.sqrt(norm1_sq), 1e-7)
    cos = backend.clip(backend.astype(dot / (n0 * n1), "float64"), -1, 1)
    theta = backend.acos(cos)
    sin_theta = backend.sin(theta)
    colinear = backend.abs(sin_theta) < eps
    safe_sin = backend.where(colinear, 1.0, sin_theta)
    c0 = backend.astype(backend.where(colinear, 1 - t, backend.sin((1 - t) * theta) / safe_sin), dtype)
    c1 = backend.astype(backend.where(colinear, t, backend.sin(t * theta) / safe_sin), dtype)
    return c0, c1


def nuslerp_merge(operands: Operands[Any]) -> None:
    w1, w2 = (float(mp["weight"]) for mp in operands.model_params)
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    shape, numel = operands.shape, operands.numel
    if numel == 0:
        return
    columns = numel // shape[0] if len(shape) >= 2 else 1
    if operands.params["nuslerp_flatten"] or len(shape) < 2 or (operands.params["nuslerp_row_wise"] and columns == 1):
        _one_vector(operands, t)  # a vector (or a single column) has only one direction to take
    elif operands.params["nuslerp_row_wise"]:
        _columns(operands, t, columns)
    else:
        _rows(operands, t, shape[-1])


def _pair(operands: Operands[Any], part: slice) -> tuple[Any, Any, Any]:
    """One slice of the two vectors (task vectors with a base) and of the base (None without one)."""
    a, b = (source.read(part) for source in operands.sources)
    if operands.base is None:
        return a, b, None
    base = operands.base.read(part)
    return a - base, b - base, base


def _write(operands: Operands[Any], part: slice, c0: Any, a: Any, c1: Any, b: Any, base: Any) -> None:
    out = c0 * a + c1 * b
    operands.out.write(part, out.reshape(-1) if base is None else base + out.reshape(-1))


def _row_slices(operands: Operands[Any], width: int) -> Iterator[slice]:
    """Flat slices of whole rows of ``width`` entries, about :data:`~.base.CHUNK` entries each."""
    return operands.chunks(max(1, contract.CHUNK // width) * width)


def _one_vector(operands: Operands[Any], t: float) -> None:
    """The whole tensor as one vector: its sums over the summation blocks, then the interpolation."""
    backend = operands.backend
    norm0_sq = norm1_sq = dot = 0.0
    for part in blocks(operands.numel):
        a, b, _ = _pair(operands, part)
        aa, bb, ab = a * a, b * b, a * b
        norm0_sq += backend.total(aa)
        norm1_sq += backend.total(bb)
        dot += backend.total(ab)
    # (1,)-arrays in the math dtype: the sums round as a whole-tensor sum would, and stay arrays through sqrt
    sums = [backend.scalar(total, like).reshape(1) for total, like in ((norm0_sq, aa), (norm1_sq, bb), (dot, ab))]
    c0, c1 = coefficients(backend, t, sums, a.dtype)
    for part in operands.chunks():
        a, b, base = _pair(operands, part)
        _write(operands, part, c0, a, c1, b, base)


def _rows(operands: Operands[Any], t: float, width: int) -> None:
    """Vectors along the last dimension: each block of whole rows interpolated alone."""
    backend = operands.backend
    for part in _row_slices(operands, width):
        a, b, base = _pair(operands, part)
        v0, v1 = a.reshape(-1, width), b.reshape(-1, width)  # (rows, width)
        sums = (backend.row_sums(v0 * v0), backend.row_sums(v1 * v1), backend.row_sums(v0 * v1))  # (rows, 1)
        c0, c1 = coefficients(backend, t, sums, a.dtype)
        _write(operands, part, c0, v0, c1, v1, base)


def _columns(operands: Operands[Any], t: float, width: int) -> None:
    """Vectors along dim 0: the column sums over every block of dim-0 rows, then the interpolation."""
    backend = operands.backend
    sums: list[Any] = []
    for part in _row_slices(operands, width):
        a, b, _ = _pair(operands, part)
        v0, v1 = a.reshape(-1, width), b.reshape(-1, width)  # (rows, width)
        products = (v0 * v0, v1 * v1, v0 * v1)
        sums = [_column_sums(backend, p, sums[i] if sums else None) for i, p in enumerate(products)]  # (width,)
    c0, c1 = coefficients(backend, t, sums, a.dtype)
    for part in _row_slices(operands, width):
        a, b, base = _pair(operands, part)
        _write(operands, part, c0, a.reshape(-1, width), c1, b.reshape(-1, width), base)


def _column_sums(backend: Backend, rows: Any, carried: Any) -> Any:
    """Σ over the rows of a (rows, width) block of each column, continuing ``carried`` (the sums of the rows
    before; None for the first block). numpy sums along a non-contiguous axis by adding one row after another,
    so with the carried sums as the block's first row the result is the sum of every row so far, added in
    row order: the bits of one sum over the whole tensor's columns. (A one-column tensor would be summed
    pairwise instead, so it is taken as one vector.)"""
    if carried is not None:
        rows = backend.concat([carried.reshape(1, -1), rows], axis=0)
    return backend.row_sums(backend.moveaxis(rows, 0, -1)).reshape(-1)


NUSLERP = Operator(
    name="nuslerp",
    merge=nuslerp_merge,
    params=(
        WEIGHT,
        Param("nuslerp_flatten", True, kind=bool, doc="Interpolate the whole tensor as one vector."),
        Param(
            "nuslerp_row_wise",
            False,
            kind=bool,
            doc="Without flatten: interpolate vectors along dim 0 instead of the last dimension.",
        ),
    ),
    base="optional",
    min_models=2,
    max_models=2,
    summary="Weighted spherical interpolation of two models, or of their task vectors over a base.",
    paper="https://doi.org/10.1145/325165.325242",
    memory="slices",
)
