"""TIES sign consensus: elect a sign per entry from the weighted deltas, keep the deltas that agree.

    σ = +1 where Σ_i Δ_i ≥ 0, else −1          (Δ_i = w_i·δ̂_i, the weighted, pruned deltas)
    a_i = [Δ_i·σ > 0]                          (a pruned zero never agrees)
    mixed = Σ_i a_i Δ_i,   divisor = Σ_i a_i w_i   (0 → 1: nothing agrees there, and the sum is 0 too)

mergekit (and so this library) elects from the *weighted* sum; the TIES paper and PEFT use the unweighted
deltas (mergekit issue #474). Yadav et al., https://arxiv.org/abs/2306.01708
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gift_merge.engine.backend import Backend


def consensus_sum(backend: Backend, weighted: Sequence[Any], weights: Sequence[float]) -> tuple[Any, Any]:
    """(mixed, divisor) of one slice; consumes ``weighted`` (the caller's temporaries).

    Float 0/1 masks rather than bool masks and ``where``, which cost 5–20× more on the CPU; σ comes from
    ``copysign``, which gives −1 only at −0, a sum of zeros, where nothing can agree anyway.
    """
    total = weighted[0] + weighted[1] if len(weighted) > 1 else backend.copy(weighted[0])
    for delta in weighted[2:]:
        total += delta
    sigma = backend.copysign(1.0, total)
    mixed = divisor = None
    for delta, weight in zip(weighted, weights, strict=True):
        agree = backend.positive(delta * sigma)
        if mixed is None or divisor is None:
            delta *= agree
            mixed = delta
            divisor = agree * backend.scalar(weight, delta)
        else:
            mixed += delta * agree
            divisor += agree * backend.scalar(weight, delta)
    assert mixed is not None and divisor is not None
    divisor += divisor == 0
    return mixed, divisor
