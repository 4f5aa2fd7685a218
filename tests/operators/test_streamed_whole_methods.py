"""sce and nuslerp stream their inputs: they read slices only, match their float64 references on tensors of
many slices, write the same bits however the tensor is sliced, and sce's variance cut streams (tiny buffer
limit) to the bits of its buffered cut, equal variances kept in index order."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from gift_merge.dtypes import FLOAT32, FLOAT64
from gift_merge.engine.backend import NUMPY
from gift_merge.operators import OPERATORS, base, gta, reductions
from gift_merge.operators.base import NO_LIMIT, Operands, Output
from gift_merge.operators.selection import top_k

from .operator_testing import assert_matches, make_inputs, random_case
from .test_interpolation_reference import nuslerp_reference
from .test_other_reference import sce_reference

SLICE = 1 << 9
"""CHUNK in these tests: a 61 × 97 tensor is 12 slices; a multiple of the summation block below."""


@pytest.fixture(autouse=True)
def small_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "CHUNK", SLICE)
    monkeypatch.setattr(reductions, "REDUCE_BLOCK", 1 << 7)
    monkeypatch.setattr(gta, "HISTOGRAM_SLICE", 700)  # radix slices that do not align with the others


class CountedSource:
    """A whole array read a flat slice at a time, remembering the largest slice read."""

    def __init__(self, values: np.ndarray) -> None:
        self.flat = values.reshape(-1)
        self.largest = 0

    def read(self, part: slice) -> np.ndarray:
        self.largest = max(self.largest, part.stop - part.start)
        return self.flat[part]


def merge(
    name: str,
    models: list[np.ndarray],
    base_values: np.ndarray | None,
    params: dict[str, Any],
    weights: list[float] | None = None,
    buffer_limit: int = NO_LIMIT,
) -> np.ndarray:
    """``name`` on numpy, every read checked to be at most a slice."""
    op = OPERATORS[name]
    inputs = make_inputs(
        op,
        [torch.from_numpy(m) for m in models],
        None,
        [{"weight": w} for w in weights] if weights else None,
        params,
    )
    sources = [CountedSource(m) for m in models]
    base_source = CountedSource(base_values) if base_values is not None else None
    shape = models[0].shape
    operands = Operands(
        sources=sources,
        base=base_source,
        shape=shape,
        backend=NUMPY,
        out=Output(NUMPY, models[0].size, FLOAT32),
        model_params=inputs.model_params,
        params=inputs.params,
        buffer_limit=buffer_limit,
        math_dtype=FLOAT64 if models[0].dtype == np.float64 else FLOAT32,
    )
    op.merge(operands)
    read = [s.largest for s in [*sources, *([base_source] if base_source else [])]]
    row = models[0].size // shape[0] if len(shape) > 1 else 0  # a slice holds at least one row
    assert max(read) <= max(base.CHUNK, gta.HISTOGRAM_SLICE, row), read  # never the whole tensor
    return operands.out.values.reshape(shape)


def case(shape: tuple[int, ...], n: int, seed: int, bf16: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    base_values, models = random_case(shape, n, seed)
    if bf16:  # bf16 checkpoints repeat values: ties in the variances
        base_values, models = base_values.bfloat16().float(), [m.bfloat16().float() for m in models]
    return base_values.numpy(), [m.numpy() for m in models]


def bits(values: np.ndarray) -> np.ndarray:
    return values.view(np.uint32)


def test_the_methods_no_longer_hold_whole_tensors() -> None:
    assert OPERATORS["sce"].memory == "stream_cuts"  # a var buffer while it fits, else nothing
    assert OPERATORS["nuslerp"].memory == "slices"


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("select_topk", [1.0, 0.6, 0.1])
def test_sce_streams_to_its_reference(select_topk: float, seed: int) -> None:
    base_values, models = case((61, 97), 3, seed)
    models[2] = base_values + 0.01 * (models[2] - base_values)  # a low-energy model: small ω
    expected = sce_reference(base_values.astype(np.float64), [m.astype(np.float64) for m in models], select_topk)
    for limit in (NO_LIMIT, 0):
        out = merge("sce", models, base_values, {"select_topk": select_topk}, buffer_limit=limit)
        assert_matches(torch.from_numpy(out), expected)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf − inf in the variance: NaN, as meant
@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sce_streamed_cut_writes_the_buffered_bits(seed: int, special: bool) -> None:
    base_values, models = case((53, 211), 2 + seed, seed, bf16=True)
    if special:  # inf and NaN variances, some above the cut
        models[0].reshape(-1)[[3, 700, 5_000]] = np.inf
        models[1].reshape(-1)[[17, 4_000]] = np.nan
    for select_topk in (0.9, 0.5, 0.05, 1e-9):
        params = {"select_topk": select_topk}
        buffered = merge("sce", models, base_values, params)
        streamed = merge("sce", models, base_values, params, buffer_limit=0)
        assert np.array_equal(bits(buffered), bits(streamed)), select_topk
    assert not np.array_equal(merge("sce", models, base_values, {"select_topk": 0.5}), base_values)  # kept some


@pytest.mark.parametrize("limit", [NO_LIMIT, 0])
def test_sce_keeps_equal_variances_in_index_order(limit: int) -> None:
    """τ_1 = v, τ_2 = 0: var = v²/4, and the output is v where kept, 0 elsewhere. v takes three values, so
    the cut falls inside a run of ties that spans many slices."""
    rng = np.random.default_rng(3)
    v = rng.choice(np.array([1.0, 2.0, 3.0], dtype=np.float32), size=5_000, p=[0.5, 0.3, 0.2])
    v[rng.integers(0, v.size, 300)] = 0.0  # zero variance: not counted in nnz
    zeros = np.zeros_like(v)
    nonzero = int(np.count_nonzero(v))
    for select_topk in (0.1, 0.35, 0.5, 0.77):
        k = int(nonzero * select_topk)
        expected = np.zeros(v.size, dtype=bool)
        expected[np.lexsort((np.arange(v.size), -v))[:k]] = True  # value descending, then index ascending
        out = merge("sce", [v, zeros], zeros, {"select_topk": select_topk}, buffer_limit=limit)
        assert np.array_equal(out != 0, expected), select_topk
        assert np.array_equal(out[expected], v[expected])


def test_sce_nan_variances_cut_as_top_k() -> None:
    """NaN variances count in nnz and are never kept, as :func:`top_k` decides on the whole var."""
    rng = np.random.default_rng(4)
    v = rng.choice(np.array([1.0, 2.0, 3.0], dtype=np.float32), size=3_000)
    v[rng.integers(0, v.size, 40)] = np.nan
    zeros = np.zeros_like(v)
    var = v**2 / 4
    for select_topk in (0.005, 0.2, 0.6):
        expected = top_k(NUMPY, var, int(np.count_nonzero(var) * select_topk))
        for limit in (NO_LIMIT, 0):
            out = merge("sce", [v, zeros], zeros, {"select_topk": select_topk}, buffer_limit=limit)
            assert np.array_equal(out != 0, expected & ~np.isnan(v)), (select_topk, limit)


def test_sce_float64_inputs_cut_on_a_buffer() -> None:
    base_values, models = case((31, 67), 3, 5)
    base_values, models = base_values.astype(np.float64), [m.astype(np.float64) for m in models]
    out = merge("sce", models, base_values, {"select_topk": 0.4}, buffer_limit=0)
    expected = sce_reference(base_values, models, 0.4)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


NUSLERP_MODES = [(True, False), (False, False), (False, True)]
"""(nuslerp_flatten, nuslerp_row_wise): one vector, rows, columns."""


@pytest.mark.parametrize(("flatten", "row_wise"), NUSLERP_MODES)
@pytest.mark.parametrize("shape", [(61, 97), (7, 9, 53), (9_001,), (3_000, 1), (1, 2_000)])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_streams_to_its_reference(
    shape: tuple[int, ...], flatten: bool, row_wise: bool, with_base: bool
) -> None:
    base_values, models = case(shape, 2, 7)
    models[1] = models[1] + 0.5 * models[0]  # not orthogonal
    params = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    b = base_values.astype(np.float64) if with_base else 0.0
    a, c = models[0].astype(np.float64) - b, models[1].astype(np.float64) - b
    expected = b + nuslerp_reference(0.9 / 1.2, a, c, flatten, row_wise)
    out = merge("nuslerp", models, base_values if with_base else None, params, weights=[0.3, 0.9])
    assert_matches(torch.from_numpy(out), expected)


@pytest.mark.parametrize(("flatten", "row_wise"), NUSLERP_MODES)
@pytest.mark.parametrize("shape", [(61, 97), (7, 9, 53), (300, 2), (9_001,), (3_000, 1)])
def test_nuslerp_writes_the_same_bits_however_sliced(
    shape: tuple[int, ...], flatten: bool, row_wise: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One slice is what the whole-tensor code computed: rows alone, and columns summed row after row."""
    base_values, models = case(shape, 2, 8)
    params = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    outputs = []
    for size in (97, SLICE, 1 << 30):  # odd rows per slice, several slices, the whole tensor
        monkeypatch.setattr(base, "CHUNK", size)
        outputs.append(merge("nuslerp", models, base_values, params, weights=[1.0, 2.0]))
    assert all(np.array_equal(bits(outputs[0]), bits(o)) for o in outputs[1:])


@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_sce_writes_the_same_bits_however_sliced(select_topk: float, monkeypatch: pytest.MonkeyPatch) -> None:
    base_values, models = case((61, 97), 3, 9, bf16=True)
    outputs = []
    for size in (128, SLICE, 1 << 30):
        monkeypatch.setattr(base, "CHUNK", size)
        outputs.append(merge("sce", models, base_values, {"select_topk": select_topk}))
    assert all(np.array_equal(bits(outputs[0]), bits(o)) for o in outputs[1:])
