"""DARE: drop and rescale, then task arithmetic (dare_linear) or TIES consensus (dare_ties).

    m_i ~ Bernoulli(ρ_i) element-wise,   δ̃_i = m_i ⊙ δ_i · ‖δ_i‖₁/‖m_i ⊙ δ_i‖₁   (rescale: true, default)
    dare_linear:  θ = θ_b + λ · Σ_i w_i δ̃_i                       (÷ Σ_i w_i if normalize)
    dare_ties:    Δ_i = w_i δ̃_i,  σ = +1 where Σ_i Δ_i ≥ 0,  m'_i = [sign Δ_i = σ]
                  θ = θ_b + λ · Σ_i m'_i Δ_i                      (÷ Σ_i m'_i w_i if normalize)

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
https://arxiv.org/abs/2311.03099

The rescale is mergekit's exact per-tensor L1-norm match, not the paper's 1/ρ (equal in expectation);
it is skipped when either norm is below 1e-7. ``normalize`` defaults to false for both, as in mergekit.
Randomness: each model, in input order, draws one uniform tensor u of the delta's shape from the
generator (on the CPU), and keeps u < ρ_i. mergekit draws from torch's global RNG, so masks differ from
mergekit's for the same seed (same distribution).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import draws
from .base import Operands, Operator, Source
from .gta import Cut, MaskCut, ReplayCut, gta_merge, gta_params
from .rescale import by_slice, streamed_l1_factor

PAPER = "https://arxiv.org/abs/2311.03099"


def random_cut(
    operands: Operands[Any], source: Source[Any], model_params: Mapping[str, Any], rescale: bool
) -> Cut | None:
    """Keep each entry with probability ρ: m ~ Bernoulli(ρ) drawn slice by slice (:mod:`draws`; consumed
    even at ρ ≥ 1), kept as a bool mask where it fits the job's buffer limit, else drawn again slice by slice
    when applied (:class:`~.gta.ReplayCut`); the rescale's norms are summed as |δ| is formed, with no buffer."""
    density = float(model_params["density"])
    if density >= 1:
        draws.skip_draws(operands.generator, operands.numel)
        return None
    backend = operands.backend
    if not operands.cuts_fit():
        replay = draws.bernoulli_replay(backend, operands.generator, operands.numel, density)
        draws.skip_draws(operands.generator, operands.numel)  # the next model's draws start where they would
        return ReplayCut(replay(), streamed_l1_factor(operands, source, by_slice(replay())) if rescale else None)
    keep = backend.empty(operands.numel, "bool")
    for part in operands.chunks():  # small draws stay in cache; even lengths keep the whole draw's order
        keep[part] = backend.from_host(draws.bernoulli(operands.generator, part.stop - part.start, density))
    return MaskCut(keep, streamed_l1_factor(operands, source, by_slice(keep.__getitem__)) if rescale else None)


def dare_linear_merge(operands: Operands[Any]) -> None:
    gta_merge(operands, random_cut, consensus=False)


def dare_ties_merge(operands: Operands[Any]) -> None:
    gta_merge(operands, random_cut, consensus=True)


DARE_LINEAR = Operator(
    name="dare_linear",
    merge=dare_linear_merge,
    params=gta_params(normalize=False, rescale=True),
    base="required",
    random=True,
    summary="Randomly drop delta entries, rescale, then add the weighted task vectors.",
    paper=PAPER,
    memory="stream_cuts",
)

DARE_TIES = Operator(
    name="dare_ties",
    merge=dare_ties_merge,
    params=gta_params(normalize=False, rescale=True),
    base="required",
    random=True,
    summary="Randomly drop delta entries, rescale, then TIES sign election and disjoint merge.",
    paper=PAPER,
    memory="stream_cuts",
)
