"""Every operator gives the same result on CUDA as on the CPU; random masks are drawn on the CPU."""

from __future__ import annotations

import pytest
import torch

from gift_merge.operators import OPERATORS

from .operator_testing import exercise_values, make_inputs, model_count, random_case


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_cuda_matches_cpu(name: str) -> None:
    op = OPERATORS[name]
    n = model_count(op)
    for shape in [(37,), (48, 80)]:
        base, models = random_case(shape, n, seed=5)
        model_values, global_values = exercise_values(op, n, seed=5)
        cpu = make_inputs(op, models, base if op.base != "ignored" else None, model_values, global_values, seed=11)
        cuda = make_inputs(
            op,
            [m.cuda() for m in models],
            base.cuda() if cpu.base is not None else None,
            model_values,
            global_values,
            seed=11,
        )
        out = op.apply(cuda)
        assert out.device.type == "cuda" and out.dtype == torch.float32
        torch.testing.assert_close(out.cpu(), op.apply(cpu), rtol=1e-5, atol=1e-5)
