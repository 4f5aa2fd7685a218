"""Pieces the SVD merges share (:mod:`tsv`, :mod:`iso`): task matrices, truncated SVDs, numerical rank,
the partial isometry (orthogonal polar factor) and the task-arithmetic path of every other tensor.

An SVD merge computes each 2-D weight matrix on its own, one output tensor per job: its inputs are read
whole (a task matrix τ_i = θ_i − θ_b is formed one model at a time where the method allows), decomposed
and the result written a block of rows at a time. Every product, decomposition and concatenation goes
through the backend, which on the CPU (numpy, and torch on the CPU) calls LAPACK/BLAS through numpy with
C-contiguous operands, so both CPU backends write the same bytes.

Small side. A float32 matrix x (m, n) is decomposed in its small dimension c = min(m, n): the float64
Gram matrix xᵀx (xxᵀ for a wide x; products of float32 entries are exact in float64, summed over fixed
blocks of rows) has eigenvalues σ_j² and eigenvectors v_j, and the large side's vectors are
u_j = x·v_j/σ_j, formed in float64. A polar factor is never formed whole: polar(x) = x·(V_ρ S_ρ⁻¹ V_ρᵀ),
and a merge's Δ is the product of a factor it has in hand with a (p, n) matrix, written a block of rows at
a time. That is BLAS-3 work of about m·n·c per Gram matrix or product, several times less than LAPACK's
SVD of the tall matrix (which also forms all of U) and the only step as large as the tensor. The float64
Gram matrix resolves singular values down to about √ε₆₄·σ_1 (1.5·10⁻⁸·σ_1), well below the float32 noise
floor, so it keeps and drops the same components as an SVD of x in float64 would. Float64 inputs (whose
floor is below that reach) take LAPACK's SVD of x.

Numerical rank. A singular value at or below the noise floor

    ε · √max(m, n) · σ_1      (ε the math dtype's machine epsilon, σ_1 the largest singular value of X)

counts as zero: it is rounding noise of an exactly rank-deficient matrix (measured at ≤ ε·σ_1 for float32
products, sums and duplicated columns of 40 to 2048 rows), and its singular vectors are an arbitrary basis
of a null space. The merges drop those components. For the full-rank task matrices of a full fine-tune
nothing changes; for low-rank ones (a LoRA fine-tune, whose inputs the planner widens to float64; a task
vector that is zero; identical tasks) it keeps the merges well defined instead of mixing LAPACK's
arbitrary null-space vectors into the result. The floor is lower than ``gift_merge.extract.svd``'s
ε·max(m, n)·σ_1 (numpy's ``matrix_rank``) on purpose: here a kept direction counts at unit weight
whatever its σ (a polar factor, Iso's common σ̄), so a small but resolved singular value must stay. (A
low-rank change stored in full float32 or bf16 weights is low-rank only up to the weights' rounding: its
components beyond the true rank are that rounding noise, kept as in the papers' code.)

Partial isometry. ``polar(X) = U_ρ V_ρᵀ`` over the ρ singular values above the floor: the closest matrix
with orthonormal columns (rows, for a wide X) to X when X has full rank, which is how TSV and Iso-CTS
orthogonalise concatenated singular vectors (``U Vᵀ`` of an SVD); on a rank-deficient X only its range.

Truncated SVD. The top k components come from the small side unless k is small next to the matrix, where a
randomized SVD (Halko, Martinsson & Tropp 2011, https://arxiv.org/abs/0909.4061: a Gaussian sketch, power
iterations, then the SVD of X restricted to the subspace found) is several times cheaper, and is checked:
subspace iterations continue until every kept triplet satisfies Xᵀu_j ≈ σ_j v_j to ``RESIDUAL_TOLERANCE``
(about ten float32 ε; a full SVD's own residual is about one), and an X that does not get there within
``MAX_REFINEMENTS`` iterations, or whose spectrum around σ_k is too flat to, takes the small side. (An
energy check, as ``gift_merge.extract.svd`` uses for LoRA extraction, is not enough here: TSV and Iso-CTS
use the singular vectors themselves, each at unit weight, not just the rank-k approximation.) The sketch
is drawn on the CPU from a generator seeded by the tensor's name alone (:func:`sketch_generator`), so a
merge writes the same bytes on every run and on both CPU backends, and the result does not depend on the
recipe's seed: it approximates a deterministic quantity, so the methods are not ``random``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import Operands, generator_for
from .reductions import flat_norm

if TYPE_CHECKING:
    from gift_merge.engine.backend import Backend

RANDOMIZED_FROM = 512
"""Matrices with fewer rows or columns than this always take the small-side decomposition."""

RANDOMIZED_MAX_FRACTION = 0.25
"""The randomized SVD is tried only when rank + oversampling ≤ this fraction of min(m, n): on 4096 × 4096
(one core) it then costs at most a fifth of a full SVD when it gives up, and at k + p = r/2 as much as
two thirds, which the fallback's full SVD would double."""

POWER_ITERATIONS = 2
"""Power iterations before the first convergence check."""

MAX_REFINEMENTS = 6
"""Further subspace iterations, each followed by the check, before falling back to the small side."""

RESIDUAL_TOLERANCE = 1e-6
"""Converged when ‖xᵀ·U_k − V_k·diag(S_k)‖_F ≤ this · σ_1 · √k (a full float32 SVD's is ~1e-7)."""

SKETCH_SEED = 0
"""The seed, with the tensor's name, of the randomized SVD's Gaussian sketch (see the module docstring)."""

BLOCK_ENTRIES = 1 << 20
"""Entries of each block of rows that a Gram matrix or a product is formed in, in float64: 8 MB, so a block
converts in the cache, and enough rows for BLAS to run at full speed."""


def oversampling(rank: int) -> int:
    """Extra sketch columns: more of them make power iterations converge faster on flat spectra."""
    return max(10, rank // 2)


def svd_work(shape: tuple[int, ...]) -> float:
    """Units an SVD merge's time is proportional to: m·n·min(m, n) for a matrix (its Gram matrices and
    products with them), the entries of any other tensor (the mean task vector)."""
    count = math.prod(shape)
    return float(count * min(shape)) if is_matrix(shape) else float(count)


def svd_workspace(shape: tuple[int, ...]) -> int:
    """Bytes an SVD merge allocates for one matrix beyond its whole float32 inputs: the large factor (U of a
    tall matrix, Vh of a wide one) in float32; for a wide matrix the float64 right-hand side of the last
    product and the float64 copy it is formed from; and about six float64 (c, c) arrays, c = min(m, n):
    the Gram matrix, its eigenvectors, LAPACK's eigh workspace and the small products."""
    if not is_matrix(shape):
        return 0
    rows, cols = shape
    small = min(rows, cols)
    return 4 * rows * cols + (16 * rows * cols if rows < cols else 0) + 48 * small * small


def is_matrix(shape: Sequence[int]) -> bool:
    """Whether a tensor takes the SVD path: exactly two dimensions, as in the papers' code (and entries)."""
    return len(shape) == 2 and min(shape) > 0


def machine_epsilon(x: Any) -> float:
    """ε of ``x``'s dtype (float32 unless the math dtype is float64), for numpy arrays and torch tensors."""
    return float(np.finfo(np.float64).eps) if str(x.dtype).endswith("float64") else float(np.finfo(np.float32).eps)


def frobenius(backend: Backend, x: Any) -> float:
    """‖x‖_F over its summation blocks: the same bits however the work is sliced."""
    return flat_norm(backend, x.reshape(-1))


def noise_floor(x: Any, scale: float) -> float:
    """The largest singular value of the matrix ``x`` that counts as zero, for its largest singular value
    ``scale`` or an upper bound of it (module docstring)."""
    return machine_epsilon(x) * math.sqrt(max(x.shape)) * scale


def rank_above(backend: Backend, s: Any, floor: float) -> int:
    """How many of the descending singular values ``s`` exceed ``floor``."""
    return backend.count(s > floor)


def largest(backend: Backend, s: Any) -> float:
    """The first (largest) of the descending singular values ``s``; 0 for none."""
    return float(backend.to_host(s[:1]).sum())


def host_sum(backend: Backend, values: Any, power: int = 1) -> float:
    """Σ values**power over a short vector (singular values), in float64 on the host."""
    host = backend.to_host(values).astype(np.float64)
    return float(np.sum(host**power))


def sketch_generator(operands: Operands[Any]) -> np.random.Generator:
    return generator_for(SKETCH_SEED, operands.tensor_name)


def task_matrix(operands: Operands[Any], index: int, base: Any) -> Any:
    """τ_i = θ_i − θ_b as an (m, n) matrix, a new array (``base`` is the whole flat base tensor)."""
    whole = slice(0, operands.numel)
    return (operands.sources[index].read(whole) - base).reshape(operands.shape)


def truncated_svd(
    backend: Backend, x: Any, k: int, generator: np.random.Generator, floor: float | None = None
) -> tuple[Any, Any, Any]:
    """The top ``k`` singular triplets of ``x`` above ``floor`` (x's own noise floor unless given):
    U (m, j), S (j,), Vh (j, n), j ≤ k."""
    rows, cols = x.shape
    k = min(k, rows, cols)
    if min(rows, cols) >= RANDOMIZED_FROM and k + oversampling(k) <= RANDOMIZED_MAX_FRACTION * min(rows, cols):
        factors = randomized_svd(backend, x, k, generator, floor)
        if factors is not None:
            u, s, vh = factors
            if floor is None:
                floor = noise_floor(x, largest(backend, s))
            keep = min(k, rank_above(backend, s, floor))
            return u[:, :keep], s[:keep], vh[:keep]
    return top_triplets(backend, x, k, floor)


def randomized_svd(
    backend: Backend, x: Any, k: int, generator: np.random.Generator, floor: float | None = None
) -> tuple[Any, Any, Any] | None:
    """U (m, q), S (q,), Vh (q, n) whose top ``k`` triplets above ``floor`` (x's own noise floor unless
    given) are accurate, or None when they do not become so within ``MAX_REFINEMENTS`` subspace iterations.

    x ≈ x·Z·Zᵀ for an orthonormal basis Z (n, q) of the dominant right subspace, so the SVD of the small
    x·Z = U·diag(S)·Wᵀ gives x·v_j = σ_j·u_j with V = Z·W. The check is the other half of that identity,
    ‖xᵀ·U_k − V_k·diag(S_k)‖_F ≤ ``RESIDUAL_TOLERANCE``·σ_1·√k, and xᵀ·U is also the next iteration's
    subspace (Z ← qr(xᵀ·U)). Iteration j shrinks the residual by about (σ_q/σ_k)² per step; when that
    rate cannot reach the tolerance in the iterations left (a flat spectrum around σ_k), the small side is
    cheaper, so this gives up at once.
    """
    rows, cols = x.shape
    width = min(k + oversampling(k), rows, cols)
    sketch = backend.astype(backend.from_host(generator.standard_normal((cols, width), dtype=np.float32)), x.dtype)
    right = backend.qr(backend.matmul(x.T, backend.qr(backend.matmul(x, sketch))))
    for _ in range(POWER_ITERATIONS):
        right = backend.qr(backend.matmul(x.T, backend.qr(backend.matmul(x, right))))
    for left in range(MAX_REFINEMENTS, -1, -1):
        u, s, wh = backend.svd(backend.matmul(x, right))
        v = backend.matmul(right, wh.T)  # x·v_j = σ_j·u_j
        back = backend.matmul(x.T, u)  # = V·diag(S) once converged
        values = backend.to_host(s).astype(np.float64)
        top = float(values[0])
        kept = min(k, rank_above(backend, s, noise_floor(x, top) if floor is None else floor))
        if kept == 0:
            return u, s, v.T
        residual = frobenius(backend, back[:, :kept] - v[:, :kept] * s[None, :kept])
        target = RESIDUAL_TOLERANCE * top * math.sqrt(kept)
        if residual <= target:
            return u, s, v.T
        rate = (values[width - 1] / values[kept - 1]) ** 2
        if left == 0 or rate >= 1 or residual * rate**left > target:
            return None
        right = backend.qr(back)
    return None


def _tall(x: Any) -> Any:
    """``x`` with at least as many rows as columns: itself, or its transpose (a view)."""
    return x if x.shape[0] >= x.shape[1] else x.T


def _row_blocks(rows: int, cols: int) -> Iterator[slice]:
    """Blocks of :data:`BLOCK_ENTRIES` entries' worth of whole rows: the order every float64 sum and
    product over rows takes, whatever else runs."""
    step = max(1, BLOCK_ENTRIES // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _block_products(backend: Backend, left: Any, right: Any, cols: int) -> Iterator[tuple[slice, Any]]:
    """``left @ right`` in float64 (``right`` float64) a block of rows at a time, with the block's rows: the
    blocks of :func:`_row_blocks` for a matrix of ``cols`` columns."""
    for block in _row_blocks(left.shape[0], cols):
        yield block, backend.matmul(backend.astype(left[block], "float64"), right)


def _product(backend: Backend, x: Any, right: Any, dtype: Any) -> Any:
    """``x @ right`` in float64 (``right`` float64), a block of rows of ``x`` at a time, in ``dtype``."""
    rows = x.shape[0]
    out = backend.empty(rows * right.shape[1], _dtype_name(dtype)).reshape(rows, right.shape[1])
    for block, product in _block_products(backend, x, right, x.shape[1]):
        out[block] = backend.astype(product, dtype)
    return out


def _dtype_name(dtype: Any) -> str:
    """A numpy or torch dtype as the backend's ``empty`` names it."""
    return str(dtype).removeprefix("torch.")


def spectrum(backend: Backend, x: Any) -> tuple[Any, Any, Any | None]:
    """x's singular values σ (descending, float64), its singular vectors on the small side as the columns
    of a (c, c) float64 array (c = min(m, n): V for a tall x, U for a wide one), and those on the large
    side where the decomposition gives them (float64 inputs), else None (module docstring: small side)."""
    tall = _tall(x)
    if machine_epsilon(x) < float(np.finfo(np.float32).eps):  # float64: the noise floor is below the Gram's reach
        u, s, vh = backend.svd(tall)
        return s, vh.T, u
    gram: Any = None
    for block in _row_blocks(*tall.shape):
        part = backend.gram(tall[block])
        gram = part if gram is None else gram + part
    values, vectors = backend.eigh(gram)
    return backend.sqrt(backend.maximum(values, 0.0)), vectors, None


Spectrum = tuple[Any, Any, Any | None]
"""What :func:`spectrum` returns: σ, the small side's singular vectors, the large side's or None."""


def top_triplets(
    backend: Backend, x: Any, k: int, floor: float | None = None, found: Spectrum | None = None
) -> tuple[Any, Any, Any]:
    """The top ``k`` singular triplets of ``x`` above ``floor`` (x's own noise floor unless given) from its
    :func:`spectrum` (``found``, else computed): U (m, j), S (j,), Vh (j, n) in x's dtype, j ≤ k. The
    large side's vectors of a float32 x are x·v_j/σ_j (xᵀ·u_j/σ_j for a wide x), formed in float64."""
    s, small, large = found if found is not None else spectrum(backend, x)
    if floor is None:
        floor = noise_floor(x, largest(backend, s))
    keep = min(k, rank_above(backend, s, floor))
    large = (
        large[:, :keep] if large is not None else _product(backend, _tall(x), small[:, :keep] / s[None, :keep], x.dtype)
    )
    small = backend.astype(small[:, :keep], x.dtype)
    values = backend.astype(s[:keep], x.dtype)
    return (large, values, small.T) if x.shape[0] >= x.shape[1] else (small, values, large.T)


def polar_factors(backend: Backend, x: Any, rank: int | None = None, found: Spectrum | None = None) -> tuple[Any, Any]:
    """(L, R) with polar(x) = L·R over x's top ``rank`` singular components (those above its noise floor
    unless given), from its :func:`spectrum` (``found``, else computed): for a float32 x, (x, V·S⁻¹·Vᵀ)
    when x is tall and (U·S⁻¹·Uᵀ, x) when it is wide, so no (m, n) factor beyond x itself is formed; for a
    float64 x, LAPACK's (U_ρ, V_ρᵀ)."""
    s, small, large = found if found is not None else spectrum(backend, x)
    if rank is None:
        rank = rank_above(backend, s, noise_floor(x, largest(backend, s)))
    small = small[:, :rank]
    tall = x.shape[0] >= x.shape[1]
    if large is not None:  # polar(X) = U_ρ·V_ρᵀ of the tall X; of x = Xᵀ its transpose
        large = large[:, :rank]
        return (large, small.T) if tall else (small, large.T)
    middle = backend.matmul(small / s[None, :rank], small.T)  # (c, c): S_ρ⁻¹ between the small side's vectors
    return (x, middle) if tall else (middle, x)


def write_product(operands: Operands[Any], base: Any, left: Any, right: Any, scale: float) -> None:
    """θ = θ_b + scale·(left·right) into the output a block of rows at a time, the product in float64 and
    rounded once to the math dtype; ``left`` (m, p) and ``right`` (p, n) are whatever the method has in
    hand (one of them may be as large as the tensor), so Δ itself is never whole in memory."""
    backend = operands.backend
    cols = operands.shape[1]
    right = backend.astype(right, "float64")
    for block, product in _block_products(backend, left, right, cols):
        part = slice(block.start * cols, block.stop * cols)
        values = backend.astype((product * scale).reshape(-1), base.dtype)
        values += base[part]
        operands.out.write(part, values)


def write_polar_merge(operands: Operands[Any], base: Any, u: Any, s: Any | None, vh: Any, scale: float) -> None:
    """θ = θ_b + scale·polar(U)·diag(S)·polar(Vh) (no diag(S) for ``s`` None), U (m, p), Vh (p, n), p ≤
    min(m, n): TSV's and Iso-CTS' recombination, associated so that the one product as large as the
    tensor is the last."""
    backend = operands.backend
    u_left, u_right = polar_factors(backend, u)
    v_left, v_right = polar_factors(backend, vh)
    as64 = functools.partial(backend.astype, dtype="float64")
    polar_v = backend.matmul(as64(v_left), as64(v_right))  # (p, n)
    if s is not None:
        u_right = as64(u_right) * as64(s)[None, :]
    write_product(operands, base, u_left, backend.matmul(as64(u_right), polar_v), scale)


def concat_triplets(backend: Backend, triplets: Sequence[tuple[Any, Any, Any]]) -> tuple[Any, Any, Any]:
    """Triplets side by side: U's columns, S's entries and Vh's rows in order."""
    return (
        backend.concat([t[0] for t in triplets], axis=1),
        backend.concat([t[1] for t in triplets], axis=0),
        backend.concat([t[2] for t in triplets], axis=0),
    )


def write_base(operands: Operands[Any], base: Any) -> None:
    """θ = θ_b (a zero Δ) into the output a slice at a time."""
    for part in operands.chunks():
        operands.out.write(part, operands.backend.copy(base[part]))


def write_nonfinite(operands: Operands[Any], base: Any) -> None:
    """An input matrix holding NaN or ±inf has no SVD: the whole output is NaN, which the writer reports
    (with the offending inputs, which the reader reports) as it does for every other method."""
    for part in operands.chunks():
        operands.out.write(part, base[part] + math.nan)


def mean_task_vector_merge(operands: Operands[Any], weights: Sequence[float], alpha: float) -> None:
    """The tensors that are not matrices: θ = θ_b + α·(1/T)·Σ_i w_i τ_i, the papers' code's mean of the
    (weighted) task vectors scaled by α, a block of rows at a time."""
    base_source = operands.base
    if base_source is None:
        raise ValueError("an SVD merge needs a base tensor")
    scale = alpha / len(operands.sources)
    for part in operands.row_chunks():
        base = base_source.read(part)
        mixed = None
        for source, weight in zip(operands.sources, weights, strict=True):
            delta = source.read(part) - base
            if weight != 1:
                delta *= weight
            if mixed is None:
                mixed = delta
            else:
                mixed += delta
        assert mixed is not None
        mixed *= scale
        mixed += base
        operands.out.write(part, mixed)
