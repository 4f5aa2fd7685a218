"""Pieces the SVD merges share (:mod:`tsv`, :mod:`iso`): task matrices, truncated SVDs, numerical rank,
the partial isometry (orthogonal polar factor) and the task-arithmetic path of every other tensor.

An SVD merge computes each 2-D weight matrix on its own, one output tensor per job: its inputs are read
whole (a task matrix τ_i = θ_i − θ_b is formed one model at a time where the method allows), decomposed in
the math dtype (float32, float64 for float64 inputs) and the result written once. Every product,
decomposition and concatenation goes through the backend, which on the CPU (numpy, and torch on the CPU)
calls LAPACK/BLAS through numpy with C-contiguous operands, so both CPU backends write the same bytes.

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

Truncated SVD. The top k components come from a full SVD unless k is small next to the matrix, where a
randomized SVD (Halko, Martinsson & Tropp 2011, https://arxiv.org/abs/0909.4061: a Gaussian sketch, power
iterations, then the SVD of X restricted to the subspace found) is several times cheaper, and is checked:
subspace iterations continue until every kept triplet satisfies Xᵀu_j ≈ σ_j v_j to ``RESIDUAL_TOLERANCE``
(about ten float32 ε; a full SVD's own residual is about one), and an X that does not get there within
``MAX_REFINEMENTS`` iterations, or whose spectrum around σ_k is too flat to, takes the full SVD. (An
energy check, as ``gift_merge.extract.svd`` uses for LoRA extraction, is not enough here: TSV and Iso-CTS
use the singular vectors themselves, each at unit weight, not just the rank-k approximation.) The sketch
is drawn on the CPU from a generator seeded by the tensor's name alone (:func:`sketch_generator`), so a
merge writes the same bytes on every run and on both CPU backends, and the result does not depend on the
recipe's seed: it approximates a deterministic quantity, so the methods are not ``random``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import Operands, generator_for
from .reductions import flat_norm

if TYPE_CHECKING:
    from gift_merge.engine.backend import Backend

RANDOMIZED_FROM = 512
"""Matrices with fewer rows or columns than this always take the full SVD (under 0.1 s on one core)."""

RANDOMIZED_MAX_FRACTION = 0.25
"""The randomized SVD is tried only when rank + oversampling ≤ this fraction of min(m, n): on 4096 × 4096
(one core) it then costs at most a fifth of a full SVD when it gives up, and at k + p = r/2 as much as
two thirds, which the fallback's full SVD would double."""

POWER_ITERATIONS = 2
"""Power iterations before the first convergence check."""

MAX_REFINEMENTS = 6
"""Further subspace iterations, each followed by the check, before falling back to the full SVD."""

RESIDUAL_TOLERANCE = 1e-6
"""Converged when ‖xᵀ·U_k − V_k·diag(S_k)‖_F ≤ this · σ_1 · √k (a full float32 SVD's is ~1e-7)."""

SKETCH_SEED = 0
"""The seed, with the tensor's name, of the randomized SVD's Gaussian sketch (see the module docstring)."""


def oversampling(rank: int) -> int:
    """Extra sketch columns: more of them make power iterations converge faster on flat spectra."""
    return max(10, rank // 2)


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
    factors = None
    if min(rows, cols) >= RANDOMIZED_FROM and k + oversampling(k) <= RANDOMIZED_MAX_FRACTION * min(rows, cols):
        factors = randomized_svd(backend, x, k, generator, floor)
    u, s, vh = factors if factors is not None else backend.svd(x)
    if floor is None:
        floor = noise_floor(x, largest(backend, s))
    keep = min(k, rank_above(backend, s, floor))
    return u[:, :keep], s[:keep], vh[:keep]


def randomized_svd(
    backend: Backend, x: Any, k: int, generator: np.random.Generator, floor: float | None = None
) -> tuple[Any, Any, Any] | None:
    """U (m, q), S (q,), Vh (q, n) whose top ``k`` triplets above ``floor`` (x's own noise floor unless
    given) are accurate, or None when they do not become so within ``MAX_REFINEMENTS`` subspace iterations.

    x ≈ x·Z·Zᵀ for an orthonormal basis Z (n, q) of the dominant right subspace, so the SVD of the small
    x·Z = U·diag(S)·Wᵀ gives x·v_j = σ_j·u_j with V = Z·W. The check is the other half of that identity,
    ‖xᵀ·U_k − V_k·diag(S_k)‖_F ≤ ``RESIDUAL_TOLERANCE``·σ_1·√k, and xᵀ·U is also the next iteration's
    subspace (Z ← qr(xᵀ·U)). Iteration j shrinks the residual by about (σ_q/σ_k)² per step; when that
    rate cannot reach the tolerance in the iterations left (a flat spectrum around σ_k), the full SVD is
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


def partial_isometry(backend: Backend, x: Any) -> Any:
    """polar(x) = U_ρ·V_ρᵀ over the singular values above the noise floor (module docstring)."""
    u, s, vh = backend.svd(x)
    rank = rank_above(backend, s, noise_floor(x, largest(backend, s)))
    return backend.matmul(u[:, :rank], vh[:rank])


def concat_triplets(backend: Backend, triplets: Sequence[tuple[Any, Any, Any]]) -> tuple[Any, Any, Any]:
    """Triplets side by side: U's columns, S's entries and Vh's rows in order."""
    return (
        backend.concat([t[0] for t in triplets], axis=1),
        backend.concat([t[1] for t in triplets], axis=0),
        backend.concat([t[2] for t in triplets], axis=0),
    )


def write_matrix_merge(operands: Operands[Any], base: Any, delta: Any | None, scale: float) -> None:
    """θ = θ_b + scale·Δ into the output a slice at a time; ``delta`` None is a zero Δ (θ = θ_b)."""
    flat = delta.reshape(-1) if delta is not None else None
    for part in operands.chunks():
        values = operands.backend.copy(base[part]) if flat is None else flat[part] * scale
        if flat is not None:
            values += base[part]
        operands.out.write(part, values)


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
