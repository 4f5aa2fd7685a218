"""Model Stock: move from the base towards the average of N ≥ 2 fine-tunes by an angle-derived ratio.

    δ_i = θ_i − θ_b   (flattened; per row along the last dimension when ``filter_wise``)
    cos Θ = mean over pairs i < j of ⟨δ_i, δ_j⟩/max(‖δ_i‖‖δ_j‖, 1e-6), clamped to [−1, 1]
    t = N cos Θ / (1 + (N − 1) cos Θ)
    θ = t · mean_i(θ_i) + (1 − t) · θ_b

Jang et al., "Model Stock: All we need is just a few fine-tuned models", https://arxiv.org/abs/2403.19522

With ``filter_wise`` each row gets its own t (a vector is one row). The paper uses a single angle; like
mergekit, several models use the mean of the pairwise cosines. t is undefined where cos Θ = −1/(N − 1)
(fine-tunes pointing in opposite directions), as in the paper.
"""

from __future__ import annotations

import torch

from .base import MergeInputs, Operator, Param
from .kernels import row_dot, row_norm


def model_stock_merge(inputs: MergeInputs) -> torch.Tensor:
    base = inputs.base
    if base is None:
        raise ValueError("model_stock needs a base tensor")
    shape = base.shape
    # (R, n): one angle per row with filter_wise, else one for the whole tensor (R = 1)
    per_row = inputs.params["filter_wise"] and base.dim() >= 2
    view = (-1, shape[-1]) if per_row else (1, -1)
    b = base.reshape(view)
    ws = [t.reshape(view) for t in inputs.tensors]
    offsets = [w - b for w in ws]
    norms = [row_norm(d) for d in offsets]  # (R, 1)

    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = row_dot(offsets[i], offsets[j])
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0)  # (R, 1)
    n = len(ws)
    t = n * cos / (1 + (n - 1) * cos)

    mean = sum(ws[1:], ws[0].clone()) / n
    return (t * mean + (1 - t) * b).reshape(shape)


MODEL_STOCK = Operator(
    name="model_stock",
    apply=model_stock_merge,
    params=(Param("filter_wise", False, kind=bool, doc="One ratio per row instead of per tensor."),),
    base="required",
    min_models=2,
    summary="Interpolate from the base towards the mean of the fine-tunes by a ratio set by their angle.",
    paper="https://arxiv.org/abs/2403.19522",
)
