"""DELLA: magnitude-ranked random drop (MagPrune) and rescale, then TIES consensus or a plain sum.

    per row of δ_i (slices along the last dimension; a vector is one row), rank |δ| ascending: r = 0..n−1,
    r̃ = r/(n − 1),  p = (ρ_i − ε_i) + 2ε_i·r̃,  m_i ~ Bernoulli(p)
    δ̃_i = m_i ⊙ δ_i · ‖δ_i‖₁/‖m_i ⊙ δ_i‖₁          (rescale: true, the default for both)
    della:         Δ_i = w_i δ̃_i, σ = +1 where Σ_i Δ_i ≥ 0, m'_i = [sign Δ_i = σ]
                   θ = θ_b + λ · Σ_i m'_i Δ_i / Σ_i m'_i w_i   (normalize: true, the default)
    della_linear:  θ = θ_b + λ · Σ_i w_i δ̃_i                  (normalize: false, the default)

Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling",
https://arxiv.org/abs/2406.11617

Like mergekit, the rescale is the per-tensor L1-norm match (the paper rescales each kept entry by 1/p).
Randomness: each model, in input order, draws one uniform tensor u of the delta's shape (on the CPU) and
keeps u < p. Differences from mergekit, each deliberate:
- Range rule: mergekit raises unless 0 < ρ − ε and ρ + ε < 1 (strict) for ρ < 1. The keep probabilities
  only need to lie in [0, 1], so here 0 ≤ ρ − ε and ρ + ε ≤ 1 is accepted (ρ = 1 keeps δ unchanged
  whatever ε, as in mergekit). The check runs before any tensor is read.
- A one-element row has no rank spread (mergekit computes 0/0 and fails); here r̃ = ½, so p = ρ.
- Equal magnitudes are ranked by index (stable sort), not in argsort's unspecified order.
- Rows are slices along the last dimension. mergekit ranks along dim 1, which is the same for the
  1-D and 2-D tensors of language models and differs only for tensors of three or more dimensions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from . import draws
from .base import Operands, Operator, Param, Source
from .checks import interval
from .gta import Cut, MaskCut, ReplayCut, gta_merge, gta_params, magnitudes
from .rescale import by_slice, masked_l1_factor, streamed_l1_factor

PAPER = "https://arxiv.org/abs/2406.11617"

EPSILON = Param(
    "epsilon",
    0.15,
    per_model=True,
    doc="Half-width of the keep-probability range around density, from smallest to largest |δ| in a row.",
    check=interval("epsilon", 0.0, float("inf")),
)

RANK_BLOCK = 1 << 18
"""Entries ranked at once: rows are independent, so the sort keys exist for one block (a few MB)."""


def magprune_cut(
    operands: Operands[Any], source: Source[Any], model_params: Mapping[str, Any], rescale: bool
) -> Cut | None:
    """Keep each entry with its rank's probability p: decided on a |δ| buffer a block of rows at a time, or
    for a tensor too large for the buffer limit, made again block by block when applied (same draws, ranks
    and mask: :class:`~.gta.ReplayCut`)."""
    density = float(model_params["density"])
    if density >= 1:
        draws.skip_draws(operands.generator, operands.numel)  # every model consumes its draws
        return None
    epsilon = float(model_params["epsilon"])
    if operands.cuts_fit():
        magnitude = magnitudes(operands, source)
        keep = keep_mask(operands, magnitude, density, epsilon)
        return MaskCut(keep, masked_l1_factor(operands.backend, magnitude, keep) if rescale else None)
    assert operands.base is not None
    base, fresh = operands.base, draws.replay_generator(operands.generator)
    draws.skip_draws(operands.generator, operands.numel)  # the next model's draws start where they would

    def replay() -> draws.Replay:
        def magnitude_of(part: slice) -> Any:
            return operands.backend.abs(source.read(part) - base.read(part))

        return draws.Replay(keep_blocks(operands, magnitude_of, fresh(), density, epsilon))

    return ReplayCut(replay(), streamed_l1_factor(operands, source, by_slice(replay())) if rescale else None)


def keep_mask(operands: Operands[Any], magnitude: Any, density: float, epsilon: float) -> Any:
    """The keep mask of a flat |δ| buffer (:func:`keep_blocks`), drawn from ``operands.generator``."""
    keep = operands.backend.empty(operands.numel, "bool")
    for _ in keep_blocks(operands, magnitude.__getitem__, operands.generator, density, epsilon, out=keep):
        pass
    return keep


def keep_blocks(
    operands: Operands[Any],
    magnitude_of: Callable[[slice], Any],
    generator: np.random.Generator | None,
    density: float,
    epsilon: float,
    out: Any = None,
) -> Iterator[Any]:
    """m ~ Bernoulli(p) as u < p, with u the entries' draws in index order (:mod:`draws`), a block of whole
    rows at a time, in order (into ``out``'s slices when given); ``magnitude_of(part)`` gives |δ| of a block.

    Ranked in sorted order: p of the r-th smallest |δ| in a row is the same for every row, so each block
    compares its draws, taken in sorted order, with one vector of p and puts the results back, without
    forming ranks. Blocks hold an even number of entries, so drawing block by block consumes the draws of
    one whole-tensor draw in the same order.
    """
    backend = operands.backend
    width = operands.shape[-1] if operands.shape else 1

    def block_for(part: slice) -> Any:
        return out[part] if out is not None else backend.empty(part.stop - part.start, "bool")

    if width == 1:  # mergekit's (rank − min)/(max − min) is 0/0 here; r̃ = ½ gives p = ρ
        p = np.float32(density - epsilon) + np.float32(0.5) * np.float32(2 * epsilon)
        for part in operands.chunks(RANK_BLOCK):
            keep = block_for(part)
            keep[:] = backend.from_host(draws.uniform(generator, part.stop - part.start) < p)
            yield keep
        return
    p_sorted = (density - epsilon) + (np.arange(width, dtype=np.float32) / (width - 1)) * (2 * epsilon)
    p_sorted = backend.from_host(p_sorted)
    rows = max(1, RANK_BLOCK // width)
    rows += rows % 2 if width % 2 else 0
    for part in operands.chunks(rows * width):
        order = backend.row_order(magnitude_of(part).reshape(-1, width))  # flat positions, each row ascending
        u = backend.from_host(draws.uniform(generator, part.stop - part.start))
        keep = block_for(part)
        keep[order] = u[order] < p_sorted
        yield keep


def check_della(params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]) -> str | None:
    """Keep probabilities ρ ± ε must be probabilities for every model that is pruned (ρ < 1)."""
    for index, mp in enumerate(model_params):
        density, epsilon = float(mp["density"]), float(mp["epsilon"])
        if density < 1 and (density - epsilon < -1e-9 or density + epsilon > 1 + 1e-9):
            return (
                "density - epsilon must be ≥ 0 and density + epsilon ≤ 1 (they bound the keep probability), "
                f"got density {density} and epsilon {epsilon} for models[{index}]"
            )
    return None


def della_merge(operands: Operands[Any]) -> None:
    gta_merge(operands, magprune_cut, consensus=True)


def della_linear_merge(operands: Operands[Any]) -> None:
    gta_merge(operands, magprune_cut, consensus=False)


DELLA = Operator(
    name="della",
    merge=della_merge,
    params=gta_params(normalize=True, rescale=True, extra=(EPSILON,)),
    base="required",
    random=True,
    summary="Drop delta entries with magnitude-ranked probabilities, rescale, then TIES consensus.",
    paper=PAPER,
    memory="stream_cuts",
    check=check_della,
)

DELLA_LINEAR = Operator(
    name="della_linear",
    merge=della_linear_merge,
    params=gta_params(normalize=False, rescale=True, extra=(EPSILON,)),
    base="required",
    random=True,
    summary="Drop delta entries with magnitude-ranked probabilities, rescale, then add the weighted deltas.",
    paper=PAPER,
    memory="stream_cuts",
    check=check_della,
)
