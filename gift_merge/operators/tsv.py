"""TSV-Merge: each task keeps its top 1/T of singular components, whose singular vectors are then
decorrelated across tasks before the sum.

For a 2-D weight with T task matrices τ_i = θ_i − θ_b, r = min(m, n) and k = ⌊r/T⌋:

    w_i τ_i ≈ U_i Σ_i V_iᵀ                      (its top k singular triplets, numerically zero ones dropped)
    U = [U_1 … U_T],  Σ = diag(Σ_1 … Σ_T),  V = [V_1 … V_T]
    Δ = polar(U) · Σ · polar(V)ᵀ               (polar(X) = P Qᵀ for X = P S Qᵀ: orthogonal Procrustes)
    θ = θ_b + α·Δ

Every other tensor (biases, norms, any tensor that is not 2-D), and a matrix with fewer rows or columns
than there are tasks (k = 0), takes the papers' code's other path, the mean task vector:

    θ = θ_b + α·(1/T)·Σ_i w_i τ_i

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025,
https://arxiv.org/abs/2412.00081

Defaults: α = 1 (FusionBench's ``config/method/task_singular_vector/TaskSingularVectorMerging.yaml``,
``alpha: 1``; the authors' own code picks α on held-out validation data from (0, 3]). ``weight`` is
FusionBench's per-model ``alpha`` list (each task vector scaled before its SVD), 1 for every model by
default. Embeddings and the LM head are matrices here, as in FusionBench (``exclude_keys`` empty by
default) and the authors' code (which excludes only CLIP's ``text_projection``).

Deviations, none of which changes a full-rank matrix with T ≤ r:
- k = ⌊r/T⌋ in integers; the authors' ``int(r · (1/T))`` is one less when the float product rounds down
  (r = T = 49 gives 0).
- Singular components at or below the noise floor (:mod:`subspaces`) are dropped before the
  orthogonalisation, and polar() is taken over X's numerical range. The authors keep them: on a
  rank-deficient τ_i (a LoRA fine-tune, a zero task vector) their arbitrary null-space vectors would
  rotate every other task's vectors in the Procrustes step.
- A matrix with r < T has k = 0: the authors' code writes Δ = 0 (the base, silently dropping every task);
  here it takes the mean-task-vector path like the tensors that are not matrices.
- The decompositions are of float32 task matrices in their small dimension, through float64 Gram
  matrices (float64 inputs: LAPACK's SVD), exact or randomized and checked where k is small next to r,
  and polar(U)·diag(Σ)·polar(V)ᵀ is formed a block of rows at a time in float64 (:mod:`subspaces`).
"""

from __future__ import annotations

import math
from typing import Any

from .base import Operands, Operator, Param
from .checks import finite
from .subspaces import (
    concat_triplets,
    frobenius,
    is_matrix,
    mean_task_vector_merge,
    sketch_generator,
    svd_work,
    svd_workspace,
    task_matrix,
    truncated_svd,
    write_base,
    write_nonfinite,
    write_polar_merge,
)

ALPHA = Param("alpha", 1.0, doc="Scale of the merged task matrix (the papers' α).", check=finite("alpha"))


def tsv_merge(operands: Operands[Any]) -> None:
    if operands.base is None:
        raise ValueError("tsv needs a base tensor")
    backend, count = operands.backend, len(operands.sources)
    weights = [float(mp["weight"]) for mp in operands.model_params]
    alpha = float(operands.params["alpha"])
    if not is_matrix(operands.shape) or min(operands.shape) < count:
        mean_task_vector_merge(operands, weights, alpha)
        return
    base = operands.base.read(slice(0, operands.numel))
    keep = min(operands.shape) // count
    generator = sketch_generator(operands)
    triplets = []
    for index, weight in enumerate(weights):  # one task matrix in memory at a time
        tau = task_matrix(operands, index, base)
        if weight != 1:
            tau *= weight
        if not math.isfinite(frobenius(backend, tau)):
            write_nonfinite(operands, base)
            return
        triplets.append(truncated_svd(backend, tau, keep, generator))
        del tau
    u, s, vh = concat_triplets(backend, triplets)
    if s.shape[0] == 0:  # every task matrix is zero
        write_base(operands, base)
        return
    write_polar_merge(operands, base, u, s, vh, alpha)


TSV = Operator(
    name="tsv",
    merge=tsv_merge,
    params=(
        Param("weight", 1.0, per_model=True, doc="Scale of this task vector before its SVD.", check=finite("weight")),
        ALPHA,
    ),
    base="required",
    min_models=1,
    summary="Per matrix: each task's top 1/T singular vectors, decorrelated across tasks, then summed.",
    paper="https://arxiv.org/abs/2412.00081",
    memory="whole",
    work=svd_work,
    workspace=svd_workspace,
)
