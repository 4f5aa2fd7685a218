"""Generalized task arithmetic (GTA): the pipeline behind task_arithmetic, ties, dare, breadcrumbs and della.

For task vectors δ_i = θ_i − θ_b, a sparsifier s (with its own ρ_i, γ_i or ε_i per model) and weights w_i:

    Δ_i = w_i · s(δ_i)
    without consensus:  mixed = Σ_i Δ_i,        divisor = Σ_i w_i        (|divisor| < 1e-8 → 1)
    with consensus:     σ = sign⁺(Σ_i Δ_i),  m_i = [sign Δ_i = σ],
                        mixed = Σ_i m_i Δ_i,    divisor = Σ_i m_i w_i    (0 → 1)
    θ = θ_b + λ · (mixed / divisor if normalize else mixed)

This is mergekit's ``GeneralizedTaskArithmeticMerge`` (sign election on the *weighted* deltas, σ = +1
where the sum is ≥ 0). Each variant differs only in its sparsifier, whether it elects signs, and the
defaults of ``normalize`` and ``rescale`` (L1-norm-match rescale after pruning, applied to whichever
sparsifier the variant uses). Task arithmetic: https://arxiv.org/abs/2212.04089
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gift_merge.lazy import torch

from . import kernels
from .base import MergeInputs, Param, StreamInputs
from .checks import DENSITY, INT8_MASK, WEIGHT, finite
from .kernels import blocked_sum, consensus_sum, cut_mask, cut_of, random_keep, skip_draws, task_vectors
from .kernels import l1_factor as rescale_factor

Sparsifier = Callable[["torch.Tensor", Mapping[str, Any], bool, "np.random.Generator | None"], "torch.Tensor"]
"""(δ_i, model i's params, rescale, generator) → pruned δ_i. Called once per model, in input order."""

CHUNK = 1 << 18  # entries per chunk of the elementwise stage: 1 MB of fp32, cache-resident (and even)

LAMBDA = Param("lambda", 1.0, doc="Scale of the merged delta.", check=finite("lambda"))


def gta_params(*, normalize: bool, rescale: bool, extra: tuple[Param, ...] = ()) -> tuple[Param, ...]:
    """The parameters every GTA variant declares, with that variant's defaults."""
    return (
        WEIGHT,
        DENSITY,
        *extra,
        LAMBDA,
        Param("normalize", normalize, kind=bool, doc="Divide the mixed delta by the (agreeing) weight sum."),
        Param("rescale", rescale, kind=bool, doc="After pruning, rescale each delta to its original L1 norm."),
        INT8_MASK,
    )


def gta_merge(inputs: MergeInputs, sparsify: Sparsifier | None, consensus: bool) -> torch.Tensor:
    """θ_b + λ·mix(w_i·s(δ_i)) as in the module docstring."""
    base = inputs.base
    if base is None:
        raise ValueError("generalized task arithmetic needs a base tensor")
    params = inputs.params
    rescale = bool(params["rescale"])
    weights = [float(mp["weight"]) for mp in inputs.model_params]
    # Sparsifiers rank or rescale over the whole tensor, so they get whole task vectors; without one the
    # task vectors are formed chunk by chunk below and never exist whole.
    deltas: list[torch.Tensor] | None = None
    if sparsify is not None:
        deltas = [
            sparsify(d, mp, rescale, inputs.generator)
            for d, mp in zip(task_vectors(inputs.tensors, base), inputs.model_params, strict=True)
        ]
    normalize, lam = bool(params["normalize"]), float(params["lambda"])
    flat_base = base.reshape(-1)
    flat_inputs = [t.reshape(-1) for t in (deltas if deltas is not None else inputs.tensors)]
    out = torch.empty_like(flat_base)
    # Everything after sparsification is elementwise: run it on cache-sized chunks, which keeps the
    # temporaries (weighted deltas, sign sums, divisors) small and in cache. Same arithmetic per element.
    for start in range(0, flat_base.numel(), CHUNK):
        part = slice(start, start + CHUNK)
        if deltas is None:
            weighted = [(t[part] - flat_base[part]).mul_(w) for t, w in zip(flat_inputs, weights, strict=True)]
        else:
            weighted = [t[part] * w for t, w in zip(flat_inputs, weights, strict=True)]
        mixed = _mix(weighted, weights, consensus, normalize)
        torch.add(flat_base[part], mixed.mul_(lam) if lam != 1 else mixed, out=out[part])
    return out.view(base.shape)


def _mix(weighted: list[torch.Tensor], weights: list[float], consensus: bool, normalize: bool) -> torch.Tensor:
    """The (normalised) combination of one chunk's weighted deltas, without λ and the base."""
    divisor: torch.Tensor | float
    if consensus:
        mixed, divisor = consensus_sum(weighted, weights)
    else:
        mixed = weighted[0]
        for d in weighted[1:]:
            mixed.add_(d)
        total = sum(weights)
        divisor = total if abs(total) >= 1e-8 else 1.0
    if normalize:
        mixed.div_(divisor)
    return mixed


@dataclass
class _MagnitudeCut:
    """Which entries a TIES trim keeps, known before any slice is masked: its k-th largest |δ|, how many
    entries equal to it are still to keep (in index order), and the L1 rescale factor, if any."""

    threshold: float
    ties_left: int
    factor: float | None

    def apply(self, delta: torch.Tensor, part: slice) -> torch.Tensor:
        """Mask (and rescale) the next slice of δ in place; slices must come in index order."""
        keep = delta.abs()
        if self.ties_left > 0:
            tied = np.flatnonzero((keep == self.threshold).cpu().numpy())[: self.ties_left]
        keep.gt_(self.threshold)  # a float 0/1 mask: bool masks are ~10× slower to multiply by in place
        if self.ties_left > 0:
            keep[torch.from_numpy(tied).to(keep.device)] = 1.0
            self.ties_left -= len(tied)
        delta.mul_(keep)
        return delta.mul_(self.factor) if self.factor is not None else delta


@dataclass
class KeepMask:
    """A drawn keep mask (DARE) and its L1 rescale factor, if any."""

    keep: torch.Tensor  # bool, flat
    factor: float | None

    def apply(self, delta: torch.Tensor, part: slice) -> torch.Tensor:
        delta.mul_(kernels.as_factor(self.keep[part]))
        return delta.mul_(self.factor) if self.factor is not None else delta


Cut = _MagnitudeCut | KeepMask
CutBuilder = Callable[[StreamInputs, "torch.Tensor", Mapping[str, Any], bool], "Cut | None"]


def magnitudes(stream: StreamInputs, tensor: torch.Tensor) -> torch.Tensor:
    """|δ| of one input, built slice by slice into one buffer: the only whole-tensor copy a stream makes."""
    n = stream.base.numel()
    magnitude: torch.Tensor | None = None
    for start in range(0, n, CHUNK):
        part = slice(start, start + CHUNK)
        d = stream.widen(tensor[part]) - stream.widen(stream.base[part])
        if magnitude is None:
            magnitude = torch.empty(n, dtype=d.dtype, device=d.device)
        torch.abs(d, out=magnitude[part])
    assert magnitude is not None
    return magnitude


def l1_factor(magnitude: torch.Tensor, keep: torch.Tensor) -> float | None:
    """The factor :func:`kernels.masked` rescales by, from the same values summed the same way.

    Consumes ``magnitude`` (masked in place, slice by slice, with float masks): every caller is done with
    it, and a tensor-sized product with a bool mask costs ~10× the two sums.
    """
    before = blocked_sum(magnitude)
    for start in range(0, magnitude.numel(), CHUNK):
        part = slice(start, start + CHUNK)
        magnitude[part].mul_(kernels.as_factor(keep[part]))
    return rescale_factor(before, blocked_sum(magnitude))


def magnitude_cut(
    stream: StreamInputs, tensor: torch.Tensor, model_params: Mapping[str, Any], rescale: bool
) -> Cut | None:
    """Phase one of a streamed TIES trim: the same selection as :func:`kernels.magnitude_mask`."""
    density = float(model_params["density"])
    if density >= 1:
        return None
    n = stream.base.numel()
    k = int(density * n)
    if k <= 0:
        return _MagnitudeCut(math.inf, 0, None)
    magnitude = magnitudes(stream, tensor)
    # Without a rescale nothing below needs |δ| in index order (the tie count is a count), so the selection
    # may reorder it in place and save the tensor-sized copy a partition would make.
    threshold, above = cut_of(magnitude, k, in_place=not rescale)
    ties = k - above
    factor = l1_factor(magnitude, cut_mask(magnitude, threshold, above, k)) if rescale else None
    return _MagnitudeCut(float(threshold), ties, factor)


def random_cut(
    stream: StreamInputs, tensor: torch.Tensor, model_params: Mapping[str, Any], rescale: bool
) -> Cut | None:
    """Phase one of a streamed DARE drop: the same draw as :func:`kernels.random_drop_mask` (consumed even
    at ρ ≥ 1, in input order), kept as a bool mask."""
    density = float(model_params["density"])
    n = stream.base.numel()
    # drawn slice by slice (even lengths, so the same raw outputs land on the same entries as one whole
    # draw): small temporaries stay in cache, where a tensor-sized draw pays a page fault every 1,024 floats
    if density >= 1:
        skip_draws(stream.generator, n)
        return None
    if CHUNK % 2:
        raise ValueError(f"gta.CHUNK must be even to draw slice by slice, got {CHUNK}")
    keep = torch.empty(n, dtype=torch.bool)
    for start in range(0, n, CHUNK):
        part = slice(start, start + CHUNK)
        keep[part] = random_keep(stream.generator, len(range(n)[part]), density)
    factor = _kept_l1_factor(stream, tensor, keep) if rescale else None
    return KeepMask(keep.to(stream.base.device), factor)


def _kept_l1_factor(stream: StreamInputs, tensor: torch.Tensor, keep: torch.Tensor) -> float | None:
    """:func:`l1_factor` without a |δ| buffer: both norms summed block by block as |δ| is formed."""
    before = after = 0.0
    for start in range(0, stream.base.numel(), kernels.REDUCE_BLOCK):
        part = slice(start, start + kernels.REDUCE_BLOCK)
        magnitude = (stream.widen(tensor[part]) - stream.widen(stream.base[part])).abs_()
        before += kernels.block_total(magnitude)
        after += kernels.block_total(magnitude.mul_(kernels.as_factor(keep[part].to(magnitude.device))))
    return rescale_factor(before, after)


def gta_stream(stream: StreamInputs, cut: CutBuilder, consensus: bool) -> torch.Tensor:
    """:func:`gta_merge` with a trim (TIES magnitude or DARE drop), reading the inputs a slice at a time.

    Phase one finds each model's cut on a buffer of |δ_i| (one tensor-sized fp32 buffer at a time);
    phase two forms, trims, weights and mixes the task vectors slice by slice. Same selection, same
    rescale factor and same per-entry arithmetic as the whole-tensor path, so the same bits, with the inputs
    never widened whole.
    """
    params = stream.params
    rescale = bool(params["rescale"])
    weights = [float(mp["weight"]) for mp in stream.model_params]
    cuts = [cut(stream, t, mp, rescale) for t, mp in zip(stream.tensors, stream.model_params, strict=True)]
    normalize, lam = bool(params["normalize"]), float(params["lambda"])
    n = stream.base.numel()
    out = torch.empty(n, dtype=stream.out_dtype)
    for start in range(0, n, CHUNK):
        part = slice(start, start + CHUNK)
        base = stream.widen(stream.base[part])
        weighted = []
        for t, trim, w in zip(stream.tensors, cuts, weights, strict=True):
            d = stream.widen(t[part]) - base
            weighted.append((trim.apply(d, part) if trim is not None else d).mul_(w))
        mixed = _mix(weighted, weights, consensus, normalize)
        out[part] = torch.add(base, mixed.mul_(lam) if lam != 1 else mixed, out=mixed)  # rounded by the copy
    return out
