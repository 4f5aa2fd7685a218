"""Helpers shared by the operator tests: inputs with defaults filled in, random cases, comparisons.

Nothing here computes a merge: references live in the test files, written in float64 numpy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from gift_merge.dtypes import FLOAT32
from gift_merge.engine.backend import NUMPY, Backend
from gift_merge.operators import REQUIRED, MergeInputs, Operator, Param, generator_for
from gift_merge.operators.base import Operands, Output, seed_for

SHAPES = [(7,), (64,), (5, 13), (24, 40)]
"""1-D and 2-D; (7,), (64,) and (5, 13) have fewer than 100 elements."""
SEEDS = [0, 1, 2]

# Non-default values that make every operator do real work (prune, select, interpolate).
EXERCISE: dict[str, Any] = {"density": 0.6, "gamma": 0.05, "epsilon": 0.1, "select_topk": 0.7, "t": 0.3}


def model_count(op: Operator, wanted: int = 3) -> int:
    """``wanted`` clipped to what the operator accepts."""
    high = op.max_models if op.max_models is not None else wanted
    return max(op.min_models, min(wanted, high))


def fill_params(
    op: Operator,
    n: int,
    model_values: Sequence[Mapping[str, Any]] | None = None,
    global_values: Mapping[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-model and global params with defaults filled in, as the planner hands them over."""
    model_values = model_values or [{}] * n
    global_values = global_values or {}
    model_params = []
    for values in model_values:
        filled = {p.name: values.get(p.name, p.default) for p in op.model_params}
        model_params.append(filled)
    params = {p.name: global_values.get(p.name, p.default) for p in op.global_params}
    for filled in [*model_params, params]:
        missing = [k for k, v in filled.items() if v is REQUIRED]
        assert not missing, f"test forgot required params {missing} for {op.name}"
    return model_params, params


def make_inputs(
    op: Operator,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_values: Sequence[Mapping[str, Any]] | None = None,
    global_values: Mapping[str, Any] | None = None,
    seed: int | None = 0,
    name: str = "model.layers.0.mlp.down_proj.weight",
    check: bool = True,
) -> MergeInputs:
    """MergeInputs as the planner builds them; with ``check`` the values must pass the operator's checks,
    so no test exercises a combination a recipe could not reach."""
    model_params, params = fill_params(op, len(tensors), model_values, global_values)
    if check:
        for p in op.params:
            for value in [mp[p.name] for mp in model_params] if p.per_model else [params[p.name]]:
                assert p.check is None or p.check(value) is None, p.check(value)
        assert op.check is None or op.check(params, model_params) is None, op.check(params, model_params)
    generator = generator_for(seed, name) if seed is not None else None
    return MergeInputs(tensors, base, model_params, params, generator, name)


def random_case(
    shape: tuple[int, ...], n: int, seed: int, spread: float = 0.5
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A float32 base and n models = base + shared direction + own noise (so consensus and angles matter)."""
    g = torch.Generator().manual_seed(1000 + seed)
    base = torch.randn(shape, generator=g)
    shared = 0.4 * spread * torch.randn(shape, generator=g)
    models = [base + shared + spread * torch.randn(shape, generator=g) for _ in range(n)]
    return base, models


def random_weights(n: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return [float(w) for w in rng.uniform(0.2, 1.2, size=n)]


def exercise_values(op: Operator, n: int, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Model and global values that exercise ``op``: random weights, EXERCISE for the rest."""
    weights = random_weights(n, seed)
    model_values = []
    for i in range(n):
        values = {p.name: EXERCISE[p.name] for p in op.model_params if usable(p, EXERCISE.get(p.name))}
        if any(p.name == "weight" for p in op.model_params):
            values["weight"] = weights[i]
        model_values.append(values)
    global_values = {p.name: EXERCISE[p.name] for p in op.global_params if usable(p, EXERCISE.get(p.name))}
    return model_values, global_values


def usable(param: Param, value: Any) -> bool:
    """``value`` is set and ``param`` accepts it (task_arithmetic accepts only density 1)."""
    return value is not None and (param.check is None or param.check(value) is None)


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def uniforms(seed: int, name: str, shape: tuple[int, ...], n: int) -> list[np.ndarray]:
    """The documented draw protocol of the random operators, written out: per model, in input order, one
    U[0, 1) per entry from a PCG64DXSM seeded by ``seed_for(seed, name)``: the top 24 bits of each 32-bit
    half (low half first) of its raw 64-bit outputs, times 2⁻²⁴."""
    bit_generator = np.random.PCG64DXSM(seed_for(seed, name))
    count = int(np.prod(shape))
    draws = []
    for _ in range(n):
        raw = bit_generator.random_raw((count + 1) // 2)
        halves = np.stack([raw & 0xFFFFFFFF, raw >> 32], axis=1).reshape(-1)[:count]
        draws.append(((halves >> 8).astype(np.float64) / 2**24).reshape(shape))
    return draws


def assert_matches(actual: torch.Tensor, expected: np.ndarray, rtol: float = 1e-5) -> None:
    """float32 operator output against a float64 reference: rtol, plus an atol scaled to the output
    (entries near zero carry the absolute rounding error of the larger terms that cancelled)."""
    assert actual.dtype == torch.float32
    assert tuple(actual.shape) == expected.shape
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(f64(actual), expected, rtol=rtol, atol=rtol * 0.1 * scale)


class ArraySource:
    """A method's input held whole in memory (numpy array or tensor), read a flat slice at a time."""

    def __init__(self, values: Any) -> None:
        self.flat = values.reshape(-1)

    def read(self, part: slice) -> Any:
        return self.flat[part]


def apply(op: Operator, inputs: MergeInputs, backend: Backend = NUMPY, buffer_limit: int = 1 << 62) -> torch.Tensor:
    """``op`` on whole float32 tensors: its implementation (:attr:`Operator.merge`) on ``backend`` (numpy
    unless told), the inputs read slice by slice as the engine's sources are; ``buffer_limit`` as the
    engine's share of the memory budget (0: every cut streams)."""
    shape = tuple(inputs.tensors[0].shape)

    def source(tensor: torch.Tensor) -> ArraySource:
        return ArraySource(tensor.detach().cpu().numpy() if backend is NUMPY else tensor)

    operands = Operands(
        sources=[source(t) for t in inputs.tensors],
        base=source(inputs.base) if inputs.base is not None else None,
        shape=shape,
        backend=backend,
        out=Output(backend, int(np.prod(shape)), FLOAT32),
        model_params=inputs.model_params,
        params=inputs.params,
        generator=inputs.generator,
        tensor_name=inputs.tensor_name,
        buffer_limit=buffer_limit,
    )
    op.merge(operands)
    values = operands.out.values.reshape(shape)
    return torch.from_numpy(values.copy()) if backend is NUMPY else values
