"""multislerp, karcher and arcee_fusion stream: no input is held whole, and the bits do not depend on slicing.

Their norms, inner products and importance quantiles span the whole tensor, so each is a pass over slices
(blocked sums; radix passes for arcee_fusion's order statistics when its importance buffer does not fit
the memory budget). These tests hold them to the bits of one slice covering the whole tensor and of a
buffered cut; the float64 references of ``test_interpolation_reference.py`` and
``test_fusion_ram_reference.py`` check the values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import gift_merge.operators.base as operator_base
import gift_merge.operators.reductions as reductions
from gift_merge.engine.compute import MethodEngine
from gift_merge.operators import OPERATORS

from .operator_testing import apply, make_inputs, random_case


def _bits(values: torch.Tensor) -> np.ndarray:
    return values.numpy().view(np.uint32).copy()


def _whole_and_sliced(monkeypatch: pytest.MonkeyPatch, run: Any) -> tuple[np.ndarray, ...]:
    """``run(buffer_limit)`` with one slice per tensor, then with many small ones, over many summation
    blocks: values held between passes, and (a zero buffer limit) formed again from the inputs in each."""
    monkeypatch.setattr(reductions, "REDUCE_BLOCK", 96)  # not a divisor of CHUNK: passes sum by blocks
    monkeypatch.setattr(operator_base, "CHUNK", 1 << 62)
    whole = _bits(run(1 << 62))
    monkeypatch.setattr(operator_base, "CHUNK", 1024)
    return whole, _bits(run(1 << 62)), _bits(run(0))


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_multislerp_streamed_equals_one_slice(monkeypatch: pytest.MonkeyPatch, with_base: bool, seed: int) -> None:
    op = OPERATORS["multislerp"]
    base, models = random_case((90, 77), 3, seed)
    weights = [{"weight": w} for w in (0.3, 0.9, 0.5)]
    inputs = make_inputs(op, models, base if with_base else None, weights)
    whole, held, streamed = _whole_and_sliced(monkeypatch, lambda limit: apply(op, inputs, buffer_limit=limit))
    assert np.array_equal(whole, held) and np.array_equal(whole, streamed)


@pytest.mark.parametrize("spread", [0.5, 0.02])
def test_karcher_streamed_equals_one_slice(monkeypatch: pytest.MonkeyPatch, spread: float) -> None:
    """Several iterations run (tol far below the first steps' ‖T‖), each forming u again from its steps."""
    op = OPERATORS["karcher"]
    _, models = random_case((61, 83), 4, 3, spread)
    inputs = make_inputs(op, models, None, global_values={"max_iter": 6, "tol": 1e-12})
    whole, held, streamed = _whole_and_sliced(monkeypatch, lambda limit: apply(op, inputs, buffer_limit=limit))
    assert np.array_equal(whole, held) and np.array_equal(whole, streamed)


def test_karcher_iterations_move_the_mean() -> None:
    """More iterations change the result (so the replayed steps above are exercised, not skipped)."""
    op = OPERATORS["karcher"]
    _, models = random_case((40, 50), 3, 5)
    one = apply(op, make_inputs(op, models, None, global_values={"max_iter": 1, "tol": 1e-12}))
    six = apply(op, make_inputs(op, models, None, global_values={"max_iter": 6, "tol": 1e-12}))
    assert not torch.equal(one, six)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-ties"])
def test_arcee_fusion_radix_quantiles_equal_the_buffered_ones(
    monkeypatch: pytest.MonkeyPatch, seed: int, bf16: bool
) -> None:
    """A budget too small for the importance buffer takes the quantiles by radix passes: the same mask."""
    op = OPERATORS["arcee_fusion"]
    base, models = random_case((120, 64), 1, seed, 0.05)
    if bf16:  # bfloat16 values: many equal importances at the quantiles
        base, models = base.bfloat16().float(), [m.bfloat16().float() for m in models]
    inputs = make_inputs(op, models, base)
    monkeypatch.setattr(operator_base, "CHUNK", 1024)
    buffered = _bits(apply(op, inputs))
    streamed = _bits(apply(op, inputs, buffer_limit=0))
    assert np.array_equal(buffered, streamed)
    assert not np.array_equal(streamed, _bits(base))  # something was taken from the fine-tune


def test_arcee_fusion_radix_quantiles_with_nan_input() -> None:
    op = OPERATORS["arcee_fusion"]
    base, models = random_case((50, 32), 1, 4, 0.05)
    models[0][3, 5] = float("nan")
    inputs = make_inputs(op, models, base)
    assert np.array_equal(_bits(apply(op, inputs)), _bits(apply(op, inputs, buffer_limit=0)))


def test_arcee_fusion_importance_is_never_negative() -> None:
    """KL ≥ 0 (Gibbs): rows whose float64 sum rounds below zero count as 0, so importances order like their
    float bits, as the radix passes need."""
    from gift_merge.engine.backend import NUMPY
    from gift_merge.operators.arcee_fusion import row_kl

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((2000, 16)).astype(np.float32)
    nudged = rows + np.float32(1e-7) * rng.standard_normal(rows.shape).astype(np.float32)
    kl = row_kl(NUMPY, nudged, rows)
    assert kl.min() >= 0 and not np.signbit(kl).any()


@pytest.mark.parametrize("method", ["multislerp", "karcher", "arcee_fusion"])
def test_streamed_methods_need_no_whole_inputs_at_70b_vocabulary_shapes(method: str) -> None:
    """The engine's working-set model for a 128256 × 8192 embedding (Llama-3-70B's): a few slices, and for
    arcee_fusion its importance buffer only while that fits the job's share of the budget."""
    from gift_merge.dtypes import BFLOAT16
    from gift_merge.plan import TensorJob, TensorSource

    inputs = tuple(
        TensorSource(f"m{i}", "model.embed_tokens.weight") for i in range(3 if method != "arcee_fusion" else 1)
    )
    base = TensorSource("base", "model.embed_tokens.weight") if method != "karcher" else None
    job = TensorJob("model.embed_tokens.weight", method, inputs, base, (), {}, (128256, 8192), BFLOAT16)
    assert MethodEngine.working_set(job, buffer_limit=1 << 29) < 1 << 26
    if method == "arcee_fusion":
        assert MethodEngine.working_set(job) > job.numel * 4  # unlimited: the buffer
