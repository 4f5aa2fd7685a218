"""Every method gives the same result on the torch backend (a GPU) as on the numpy one (the CPU), within
float32 rounding of reductions; random masks are drawn on the CPU, so they are the same masks."""

from __future__ import annotations

import pytest
import torch

from gift_merge.engine.backend import TorchBackend
from gift_merge.operators import OPERATORS

from .operator_testing import apply, exercise_values, make_inputs, model_count, random_case


def _agree(name: str, device: str) -> None:
    op = OPERATORS[name]
    n = model_count(op)
    for shape in [(37,), (48, 80), (300, 1000)]:
        base, models = random_case(shape, n, seed=5)
        model_values, global_values = exercise_values(op, n, seed=5)
        on_cpu = make_inputs(op, models, base if op.base != "ignored" else None, model_values, global_values, seed=11)
        on_device = make_inputs(
            op,
            [m.to(device) for m in models],
            base.to(device) if on_cpu.base is not None else None,
            model_values,
            global_values,
            seed=11,
        )
        out = apply(op, on_device, TorchBackend(device))
        assert out.device.type == device and out.dtype == torch.float32
        expected = apply(op, on_cpu)
        if device == "cpu":  # numpy does the CPU torch backend's sums: same bits
            assert torch.equal(out, expected)
        torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_torch_backend_matches_numpy(name: str) -> None:
    """The torch backend on the CPU: what a GPU runs, checked on every machine."""
    _agree(name, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_cuda_matches_cpu(name: str) -> None:
    _agree(name, "cuda")
