"""Iso-C and Iso-CTS: isotropic merging. The merged task matrix keeps its singular vectors but every
singular value becomes their mean, so no direction (no task) dominates; Iso-CTS first makes room for
each task's own directions outside the common ones.

For a 2-D weight with T task matrices τ_i = θ_i − θ_b and r = min(m, n):

Iso-C (``iso_c``):

    Σ_i τ_i = U S Vᵀ,     σ̄ = mean of the singular values,     θ = θ_b + α·σ̄·U Vᵀ

Iso-CTS (``iso_cts``), with the common-space fraction f:

    k = ⌊f·r⌋,  d = round((r − k)/T),  k = r − T·d     (the task-specific space divides evenly by T)
    U_c S_c V_cᵀ   = the top k triplets of Σ_i τ_i                          (common subspace)
    U_i S_i V_iᵀ   = the top d triplets of τ_i − U_c U_cᵀ τ_i, for each i   (task-specific subspaces)
    U = [U_1 … U_T U_c],  V = [V_1 … V_T V_c],  σ̄ = mean of all their singular values
    θ = θ_b + α·σ̄·polar(U)·polar(V)ᵀ         (polar(X) = P Qᵀ for X = P S Qᵀ)

With f = 1 (d = 0) Iso-CTS is Iso-C. Every other tensor (biases, norms, any tensor that is not 2-D)
takes the papers' code's other path, the mean task vector: θ = θ_b + α·(1/T)·Σ_i τ_i.

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces",
ICML 2025, https://arxiv.org/abs/2502.04959

Defaults: α = 1 (FusionBench's ``config/method/isotropic_merging/iso_c.yaml`` and ``iso_cts.yaml``,
``scaling_factor: 1.0``; the authors pick α on held-out validation data from (0, 3], and FusionBench's
documentation runs both at 1.5 on CLIP ViT-B/32 and ViT-L/14), f = 0.8 (``common_space_fraction`` in
the authors' ``config/method/iso_cts.yaml`` and FusionBench's). There are no per-model weights: the
papers define none. Embeddings and the LM head are matrices here, as in FusionBench (``exclude_keys``
empty by default) and the authors' code (which excludes only CLIP's ``text_projection``).

Deviations, none of which changes a full-rank sum of task matrices:
- Singular components at or below the noise floor (:mod:`subspaces`) are dropped: σ̄ is the mean over
  the ρ components kept (Σσ/ρ, the authors' Σσ/r when ρ = r: the trace norm is preserved either way)
  and U Vᵀ spans only them. On a rank-deficient sum (low-rank task matrices, tasks that cancel) the
  authors' code gives σ̄ to r − ρ arbitrary null-space directions that LAPACK happens to return.
- Iso-CTS: the common subspace keeps only the components of Σ_i τ_i above the floor, and each task's
  residual only those above τ_i's floor (for σ_1(τ_i), which no SVD gives here, ‖τ_i‖_F ≥ σ_1). When f
  is so small that the authors' rounding asks for more than r task-specific directions (r = 3, T = 2,
  f = 0 gives k = −1 there), T·d is capped at T·⌊r/T⌋.
- The decompositions are of float32 matrices in their small dimension, through float64 Gram matrices
  (float64 inputs: LAPACK's SVD), and U Vᵀ is formed a block of rows at a time in float64 without
  forming U (:mod:`subspaces`). Iso-CTS's task-specific SVDs (d ≪ r) may be randomized and checked.
"""

from __future__ import annotations

import math
from typing import Any

from .base import Operands, Operator, Param
from .checks import interval
from .subspaces import (
    Spectrum,
    concat_triplets,
    frobenius,
    host_sum,
    is_matrix,
    largest,
    mean_task_vector_merge,
    noise_floor,
    polar_factors,
    rank_above,
    sketch_generator,
    spectrum,
    svd_work,
    svd_workspace,
    task_matrix,
    top_triplets,
    truncated_svd,
    write_base,
    write_nonfinite,
    write_polar_merge,
    write_product,
)
from .tsv import ALPHA


def subspace_sizes(rank: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(k, d): the common subspace's size and each task's, by the authors' arithmetic (Python's ``int``
    and ``round``), with T·d capped at T·⌊r/T⌋."""
    common = int(rank * fraction)
    specific = min(round((rank - common) / tasks) * tasks, rank // tasks * tasks)
    return rank - specific, specific // tasks


def _task_sum(operands: Operands[Any], base: Any) -> tuple[Any, bool]:
    """Σ_i τ_i as a matrix, and whether its entries are finite."""
    total = task_matrix(operands, 0, base)
    for index in range(1, len(operands.sources)):
        total += task_matrix(operands, index, base)
    return total, math.isfinite(frobenius(operands.backend, total))


def _summed(operands: Operands[Any], name: str) -> tuple[Any, Any, Spectrum, int] | None:
    """What both methods start from: the base matrix, Σ_i τ_i, its spectrum and its numerical rank; or
    None when the tensor is already written (not a matrix: the mean task vector; non-finite: NaN)."""
    if operands.base is None:
        raise ValueError(f"{name} needs a base tensor")
    backend = operands.backend
    if not is_matrix(operands.shape):
        mean_task_vector_merge(operands, [1.0] * len(operands.sources), float(operands.params["alpha"]))
        return None
    base = operands.base.read(slice(0, operands.numel))
    total, finite = _task_sum(operands, base)
    if not finite:
        write_nonfinite(operands, base)
        return None
    found = spectrum(backend, total)
    s = found[0]
    return base, total, found, rank_above(backend, s, noise_floor(total, largest(backend, s)))


def _isotropic(operands: Operands[Any], base: Any, total: Any, found: Spectrum, rank: int) -> None:
    """θ_b + α·σ̄·U_r V_rᵀ over the top ``rank`` components of Σ_i τ_i (the base alone for rank 0)."""
    if rank == 0:
        write_base(operands, base)
        return
    mean = host_sum(operands.backend, found[0][:rank]) / rank
    left, right = polar_factors(operands.backend, total, rank, found)
    write_product(operands, base, left, right, float(operands.params["alpha"]) * mean)


def iso_c_merge(operands: Operands[Any]) -> None:
    found = _summed(operands, "iso_c")
    if found is not None:
        _isotropic(operands, *found)


def iso_cts_merge(operands: Operands[Any]) -> None:
    found = _summed(operands, "iso_cts")
    if found is None:
        return
    base, total, spectrum_of_total, rank = found
    backend, count = operands.backend, len(operands.sources)
    common, specific = subspace_sizes(min(operands.shape), count, float(operands.params["common_space_fraction"]))
    common = min(common, rank)
    triplets = []
    if specific > 0:
        u_c, s_c, vh_c = top_triplets(backend, total, common, found=spectrum_of_total)
        generator = sketch_generator(operands)
        for index in range(count):  # one task matrix in memory at a time
            tau = task_matrix(operands, index, base)
            task_floor = noise_floor(tau, frobenius(backend, tau))  # ‖τ_i‖_F ≥ σ_1(τ_i): no SVD of τ_i is at hand
            tau -= backend.matmul(u_c, backend.matmul(u_c.T, tau))  # the part outside the common subspace
            triplets.append(truncated_svd(backend, tau, specific, generator, task_floor))
            del tau
    if not any(t[1].shape[0] for t in triplets):  # no task-specific directions: Iso-C over the common ones
        _isotropic(operands, base, total, spectrum_of_total, common)
        return
    del total
    u, s, vh = concat_triplets(backend, [*triplets, (u_c, s_c, vh_c)])
    mean = host_sum(backend, s) / s.shape[0]
    write_polar_merge(operands, base, u, None, vh, float(operands.params["alpha"]) * mean)


ISO_C = Operator(
    name="iso_c",
    merge=iso_c_merge,
    params=(ALPHA,),
    base="required",
    min_models=1,
    summary="Per matrix: the sum of task matrices with every singular value set to their mean.",
    paper="https://arxiv.org/abs/2502.04959",
    memory="whole",
    work=svd_work,
    workspace=svd_workspace,
)

ISO_CTS = Operator(
    name="iso_cts",
    merge=iso_cts_merge,
    params=(
        Param(
            "common_space_fraction",
            0.8,
            doc="Fraction of each matrix's rank given to the common subspace; the rest is split among the tasks.",
            check=interval("common_space_fraction", 0.0, 1.0),
        ),
        ALPHA,
    ),
    base="required",
    min_models=1,
    summary="Iso-C over common plus per-task subspaces: orthogonalised singular vectors, equal singular values.",
    paper="https://arxiv.org/abs/2502.04959",
    memory="whole",
    work=svd_work,
    workspace=svd_workspace,
)
