"""Magnitude cuts of tensors too large for a |δ| buffer: radix passes over |δ| formed again slice by slice
find the same threshold and keep the same entries, so the merge writes the same bits as with a buffer."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gift_merge.cli import main
from gift_merge.dtypes import FLOAT32, FLOAT64
from gift_merge.engine.backend import NUMPY
from gift_merge.engine.selection import kth_largest_and_count, streamed_kth_largest
from gift_merge.operators import della, draws, get_operator, gta
from gift_merge.operators.base import Operands, Output

from .operator_testing import apply, make_inputs


def _histogram_of(values: np.ndarray, slice_size: int):
    def histogram(high: int | None) -> np.ndarray:
        counts = np.zeros(1 << 16, dtype=np.int64)
        for start in range(0, values.size, slice_size):
            counts += NUMPY.bit_histogram(values[start : start + slice_size], high)
        return counts

    return histogram


def _magnitudes(rng: np.random.Generator, n: int, special: bool) -> np.ndarray:
    values = np.abs(rng.standard_normal(n).astype(np.float32) * 1e-3)
    values = torch.from_numpy(values).bfloat16().float().numpy()  # bf16 deltas repeat values: many ties
    values[rng.integers(0, n, n // 20)] = 0.0
    if special:
        values[rng.integers(0, n, 7)] = np.inf
        values[rng.integers(0, n, 5)] = np.nan
        values[rng.integers(0, n, 3)] = np.float32(np.nan) * -1  # another NaN payload, sign cleared below
        values = np.abs(values)
    return values


@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_kth_largest_is_the_buffered_answer(seed: int, special: bool) -> None:
    rng = np.random.default_rng(seed)
    values = _magnitudes(rng, 20_011, special)
    histogram = _histogram_of(values, 3_001)
    for k in [1, 2, 5, 6, 12, 13, 100, 5_000, 10_005, 19_000, 20_010, 20_011, *rng.integers(1, 20_011, 20)]:
        expected_value, expected_above = kth_largest_and_count(values.copy(), int(k))
        value, above = streamed_kth_largest(histogram, int(k))
        assert above == expected_above, k
        assert np.array_equal(np.float32(value), expected_value, equal_nan=True), (k, value, expected_value)


@pytest.mark.parametrize(
    "method", ["ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties", "dare_linear", "della", "della_linear"]
)
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_cut_writes_the_buffered_bits(
    method: str, rescale: bool, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gta, "HISTOGRAM_SLICE", 4_099)  # several radix slices on a small tensor
    monkeypatch.setattr(draws, "REPLAY_BLOCK", 1_000)  # several redrawn blocks, across the cut's slices
    monkeypatch.setattr(della, "RANK_BLOCK", 5_000)  # several blocks of ranked rows
    g = torch.Generator().manual_seed(seed)
    shape = (181, 733)  # more entries than one summation block: ties and sums cross slices
    base = torch.randn(shape, generator=g)
    tensors = [(base + torch.randn(shape, generator=g) * 1e-2).bfloat16().float() for _ in range(3)]
    base = base.bfloat16().float()
    if seed == 2:  # inf and NaN in a task vector
        tensors[0].view(-1)[[5, 9_000, 70_000]] = float("inf")
        tensors[1].view(-1)[[17, 40_000]] = float("nan")
    op = get_operator(method)
    model_values = [
        {"density": d, "gamma": 0.02, "epsilon": 0.1, "weight": w} for d, w in ((0.3, 1.0), (0.55, 0.7), (0.85, 0.4))
    ]
    inputs = make_inputs(op, tensors, base, model_values, {"rescale": rescale})
    buffered = apply(op, inputs).numpy()
    if op.random:  # a fresh generator for the second run, seeded alike
        inputs = make_inputs(op, tensors, base, model_values, {"rescale": rescale})
    streamed = apply(op, inputs, buffer_limit=0).numpy()
    assert np.array_equal(buffered.view(np.uint32), streamed.view(np.uint32))
    assert not np.array_equal(buffered, base.numpy())  # the cut kept something


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties", "della"])
def test_a_small_memory_budget_streams_cuts_and_writes_the_same_shards(
    tmp_path: Path, llama: dict[str, Path], method: str, caplog: pytest.LogCaptureFixture
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: {method}\nbase_model: {llama['base']}\nmodels:\n"
        f"  - {{model: {llama['math']}, parameters: {{weight: 0.6, density: 0.5}}}}\n"
        f"  - {{model: {llama['code']}, parameters: {{weight: 0.5, density: 0.7}}}}\n"
        "parameters: {rescale: true}\ndtype: bfloat16\n"
    )
    shards = {}
    for label, extra in (("default", []), ("streamed", ["--max-memory", "1KB"])):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="gift_merge"):
            result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / label), *extra])
        assert result.exit_code == 0, result.output
        said = any("stream their cuts" in record.getMessage() for record in caplog.records)
        assert said == (label == "streamed")  # the run says why it is slower
        shards[label] = {p.name: p.read_bytes() for p in sorted((tmp_path / label).glob("*.safetensors"))}
    assert shards["default"] and shards["default"] == shards["streamed"]


def test_the_memory_budget_decides_which_cuts_stream() -> None:
    from gift_merge.engine.executor import buffer_limit

    assert buffer_limit(1 << 30, 2) == (1 << 30) // 3
    assert _operands(800, buffer_limit=4000).selects_on_buffer()  # 800 × (4 + 1 mask byte)
    assert not _operands(801, buffer_limit=4000).selects_on_buffer()
    assert replace(_operands(801, buffer_limit=4000), math_dtype=FLOAT64).selects_on_buffer()  # radix: float32


class _Float32Source:
    def read(self, part: slice) -> np.ndarray:
        return np.zeros(part.stop - part.start, dtype=np.float32)


def _operands(count: int, buffer_limit: int) -> Operands:
    return Operands(
        [_Float32Source()], _Float32Source(), (count,), NUMPY, Output(NUMPY, count, FLOAT32), buffer_limit=buffer_limit
    )


def test_a_tensor_above_the_whole_budget_is_named(caplog: pytest.LogCaptureFixture) -> None:
    """An SVD merge holds whole matrices: at Llama-3-70B's embedding that passes a 1 GiB budget, and the run
    says which tensor and how much, where a streaming method says nothing."""
    from types import SimpleNamespace

    from gift_merge.dtypes import BFLOAT16
    from gift_merge.engine import executor
    from gift_merge.plan import TensorJob, TensorSource

    def jobs(method: str) -> list[TensorJob]:
        def source(model: str, name: str) -> TensorSource:
            return TensorSource(model, name)

        return [
            TensorJob(
                name, method, (source("a", name), source("b", name)), source("base", name), (), {}, shape, BFLOAT16
            )
            for name, shape in (("model.norm.weight", (8192,)), ("model.embed_tokens.weight", (128256, 8192)))
        ]

    budget = 1 << 30
    for method, warned in (("iso_c", True), ("ties", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gift_merge"):
            planned = jobs(method)
            limit = executor.buffer_limit(budget, 2)
            costs = [executor.MethodEngine.working_set(job, limit) for job in planned]
            executor._say_what_passes_the_budget(SimpleNamespace(jobs=planned), costs, budget)
        said = [record.getMessage() for record in caplog.records]
        assert bool(said) == warned, said
        if warned:
            assert "model.embed_tokens.weight" in said[0] and "1 tensor(s)" in said[0]
