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

import math
from collections.abc import Sequence
from typing import Any

from . import base as base_module
from .base import Operands, Operator, Param
from .reductions import blocks


def _ratio(pairs: dict[tuple[int, int], float], n: int) -> float:
    """t = N cos Θ / (1 + (N − 1) cos Θ) from ⟨δ_i, δ_j⟩ for i ≤ j (the i = j entries are ‖δ_i‖²)."""
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            scale = max(math.sqrt(pairs[i, i]) * math.sqrt(pairs[j, j]), 1e-6)
            cosines.append(min(max(pairs[i, j] / scale, -1.0), 1.0))
    cos = sum(cosines) / len(cosines)
    return n * cos / (1 + (n - 1) * cos)


def _pair_dots(operands: Operands[Any]) -> dict[tuple[int, int], float]:
    """⟨δ_i, δ_j⟩ for i ≤ j, over the summation blocks, a slice at a time."""
    assert operands.base is not None
    backend, count = operands.backend, len(operands.sources)
    pairs = dict.fromkeys(((i, j) for i in range(count) for j in range(i, count)), 0.0)
    for part in blocks(operands.numel):
        base = operands.base.read(part)
        offsets = [source.read(part) - base for source in operands.sources]
        for i, j in pairs:
            pairs[i, j] += backend.total(offsets[i] * offsets[j])
    return pairs


def _rows(operands: Operands[Any], ws: Sequence[Any], b: Any) -> Any:
    """The ``filter_wise`` interpolation of (R, n) rows: one t per row from its own angle."""
    backend = operands.backend
    offsets = [w - b for w in ws]
    norms = [backend.sqrt(backend.row_sums(d * d)) for d in offsets]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = backend.row_sums(offsets[i] * offsets[j])
            cosines.append(backend.clip(dot / backend.maximum(norms[i] * norms[j], 1e-6), -1, 1))
    cos = sum(cosines[1:], cosines[0]) / len(cosines)
    n = len(ws)
    t = n * cos / (1 + (n - 1) * cos)
    mean = sum(ws[1:], ws[0]) / n
    return t * mean + (1 - t) * b


def model_stock_merge(operands: Operands[Any]) -> None:
    base = operands.base
    if base is None:
        raise ValueError("model_stock needs a base tensor")
    shape, count = operands.shape, len(operands.sources)
    if operands.params["filter_wise"] and len(shape) >= 2:
        width = shape[-1]
        for part in operands.chunks(max(1, base_module.CHUNK // width) * width):  # whole rows: each has its own t
            ws = [source.read(part).reshape(-1, width) for source in operands.sources]
            operands.out.write(part, _rows(operands, ws, base.read(part).reshape(-1, width)).reshape(-1))
        return
    t = _ratio(_pair_dots(operands), count)  # one angle for the whole tensor
    for part in operands.chunks():
        ws = [source.read(part) for source in operands.sources]
        mean = sum(ws[1:], ws[0]) / count
        operands.out.write(part, t * mean + (1 - t) * base.read(part))


MODEL_STOCK = Operator(
    name="model_stock",
    merge=model_stock_merge,
    params=(Param("filter_wise", False, kind=bool, doc="One ratio per row instead of per tensor."),),
    base="required",
    min_models=2,
    summary="Interpolate from the base towards the mean of the fine-tunes by a ratio set by their angle.",
    paper="https://arxiv.org/abs/2403.19522",
)
