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

import numpy as np

from gift_merge.floatbits import narrow
from gift_merge.lazy import torch

from . import gta, kernels
from .base import MergeInputs, Operator, Param, StreamInputs
from .kernels import array_row_dot, array_row_norm, flat_dot, row_dot, row_norm


def model_stock_merge(inputs: MergeInputs) -> torch.Tensor:
    base = inputs.base
    if base is None:
        raise ValueError("model_stock needs a base tensor")
    if not (inputs.params["filter_wise"] and base.dim() >= 2):
        # one angle for the whole tensor, from blocked float64 sums (as the streamed path computes them)
        offsets = [(t - base).reshape(-1) for t in inputs.tensors]
        pairs = {(i, j): flat_dot(offsets[i], offsets[j]) for i in range(len(offsets)) for j in range(i, len(offsets))}
        return _interpolate(inputs.tensors, base, _ratio(pairs, len(offsets)))
    shape = base.shape
    view = (-1, shape[-1])  # (R, n): one angle per row
    b = base.reshape(view)
    ws = [t.reshape(view) for t in inputs.tensors]
    offsets = [w - b for w in ws]
    norms = [row_norm(d) for d in offsets]  # (R, 1)
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = row_dot(offsets[i], offsets[j])
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = sum(cosines[1:], cosines[0]) / len(cosines)  # (R, 1), summed in pair order
    n = len(ws)
    t = n * cos / (1 + (n - 1) * cos)
    mean = sum(ws[1:], ws[0].clone()) / n
    return (t * mean + (1 - t) * b).reshape(shape)


def _ratio(pairs: dict[tuple[int, int], float], n: int) -> float:
    """t = N cos Θ / (1 + (N − 1) cos Θ) from ⟨δ_i, δ_j⟩ for i ≤ j (the i = j entries are ‖δ_i‖²)."""
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            scale = max(math.sqrt(pairs[i, i]) * math.sqrt(pairs[j, j]), 1e-6)
            cosines.append(min(max(pairs[i, j] / scale, -1.0), 1.0))
    cos = sum(cosines) / len(cosines)
    return n * cos / (1 + (n - 1) * cos)


def _interpolate(tensors: Sequence[torch.Tensor], base: torch.Tensor, t: float) -> torch.Tensor:
    mean = sum(tensors[1:], tensors[0].clone()) / len(tensors)
    return t * mean + (1 - t) * base


def _pair_dots(stream: StreamInputs[Any]) -> dict[tuple[int, int], float]:
    """⟨δ_i, δ_j⟩ for i ≤ j over the blocks :func:`kernels.flat_dot` sums, a slice at a time; torch
    tensors or numpy arrays alike (one sum, :func:`kernels.block_total`)."""
    count = len(stream.tensors)
    pairs = dict.fromkeys(((i, j) for i in range(count) for j in range(i, count)), 0.0)
    for start in range(0, len(stream.base), kernels.REDUCE_BLOCK):
        part = slice(start, start + kernels.REDUCE_BLOCK)
        base = stream.widen(stream.base[part])
        offsets = [stream.widen(t[part]) - base for t in stream.tensors]
        for i, j in pairs:
            pairs[i, j] += kernels.block_total(offsets[i] * offsets[j])
    return pairs


def model_stock_stream(stream: StreamInputs) -> torch.Tensor:
    """:func:`model_stock_merge` a slice at a time: the inner products over the blocks
    :func:`kernels.flat_dot` sums, then the interpolation; ``filter_wise`` rows are independent, so they
    go through the whole-tensor function a block of rows at a time."""
    n = stream.base.numel()
    out = torch.empty(n, dtype=stream.out_dtype)
    if stream.params["filter_wise"] and len(stream.shape) >= 2:
        width = stream.shape[-1]
        rows = max(1, gta.CHUNK // width) * width
        for start in range(0, n, rows):
            part = slice(start, start + rows)
            block = MergeInputs(
                tensors=[stream.widen(t[part]).view(-1, width) for t in stream.tensors],
                base=stream.widen(stream.base[part]).view(-1, width),
                params=stream.params,
            )
            out[part] = model_stock_merge(block).reshape(-1)
        return out
    count = len(stream.tensors)
    t = _ratio(_pair_dots(stream), count)
    for start in range(0, n, gta.CHUNK):
        part = slice(start, start + gta.CHUNK)
        out[part] = _interpolate([stream.widen(x[part]) for x in stream.tensors], stream.widen(stream.base[part]), t)
    return out


def _rows_numpy(ws: Sequence[np.ndarray], b: np.ndarray) -> np.ndarray:
    """The ``filter_wise`` branch of :func:`model_stock_merge` in numpy, on (R, n) rows: same order of
    operations, and the row sums both engines take (:func:`kernels.array_row_dot`)."""
    offsets = [w - b for w in ws]
    norms = [array_row_norm(d) for d in offsets]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = array_row_dot(offsets[i] * offsets[j])
            cosines.append(np.clip(dot / np.maximum(norms[i] * norms[j], 1e-6), -1, 1))
    cos = sum(cosines[1:], cosines[0]) / len(cosines)
    n = len(ws)
    t = n * cos / (1 + (n - 1) * cos)
    mean = sum(ws[1:], ws[0]) / n
    return t * mean + (1 - t) * b


def model_stock_numpy_stream(stream: StreamInputs[np.ndarray]) -> np.ndarray:
    """:func:`model_stock_stream` in numpy; returns the output's bits."""
    n = stream.base.size
    out = np.empty(n, dtype=stream.out_dtype.storage)
    if stream.params["filter_wise"] and len(stream.shape) >= 2:
        width = stream.shape[-1]
        rows = max(1, gta.CHUNK // width) * width
        for start in range(0, n, rows):
            part = slice(start, start + rows)
            ws = [stream.widen(t[part]).reshape(-1, width) for t in stream.tensors]
            mixed = _rows_numpy(ws, stream.widen(stream.base[part]).reshape(-1, width))
            narrow(mixed.reshape(-1), stream.out_dtype, out[part])
        return out
    count = len(stream.tensors)
    t = _ratio(_pair_dots(stream), count)
    for start in range(0, n, gta.CHUNK):
        part = slice(start, start + gta.CHUNK)
        ws = [stream.widen(x[part]) for x in stream.tensors]
        mean = sum(ws[1:], ws[0]) / count
        narrow(t * mean + (1 - t) * stream.widen(stream.base[part]), stream.out_dtype, out[part])
    return out


MODEL_STOCK = Operator(
    name="model_stock",
    apply=model_stock_merge,
    params=(Param("filter_wise", False, kind=bool, doc="One ratio per row instead of per tensor."),),
    base="required",
    min_models=2,
    summary="Interpolate from the base towards the mean of the fine-tunes by a ratio set by their angle.",
    paper="https://arxiv.org/abs/2403.19522",
    stream=model_stock_stream,
    numpy_stream=model_stock_numpy_stream,
)
