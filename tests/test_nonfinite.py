"""NaN and ±inf in an input or output tensor are reported with the tensor's name and count (an input's
with its file, once per run whichever engine reads it, however often); ``--strict`` refuses."""

from __future__ import annotations

import json
import logging
import random
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

import gift_merge.engine.blocks as blocks
import gift_merge.io.finite as finite
from gift_merge.cli import main
from gift_merge.dtypes import BFLOAT16, FLOAT16, FLOAT32, FLOAT64, INT32, DType
from gift_merge.engine.executor import PROCESSES_ENV
from gift_merge.errors import GiftMergeError
from gift_merge.io.finite import BLOCK, InputWatch, NonFinite, count_nonfinite
from gift_merge.io.reader import ALLOW_PICKLE_ENV, CheckpointReader
from tests.test_chunking import digest


def fresh_rng() -> tuple[np.random.Generator, int]:
    """A generator from a new seed each run (the seed goes into every assertion message, to replay a failure)."""
    seed = random.SystemRandom().randrange(2**32)
    return np.random.default_rng(seed), seed


@pytest.mark.parametrize("dtype", [FLOAT64, FLOAT32, FLOAT16, BFLOAT16])
def test_counts_equal_numpy_on_random_arrays(dtype) -> None:
    rng = np.random.default_rng(3)
    values = rng.standard_normal(BLOCK * 2 + 77).astype(np.float32) * 100
    nan_at = rng.choice(values.size, 31, replace=False)
    inf_at = rng.choice(np.setdiff1d(np.arange(values.size), nan_at), 17, replace=False)
    values[nan_at] = np.nan
    values[inf_at] = np.where(rng.random(17) < 0.5, np.inf, -np.inf)
    if dtype is BFLOAT16:  # the top half of fp32 bits; NaNs keep a set mantissa bit
        stored = (values.view(np.uint32) >> 16).astype(np.uint16)
        reference = values
    else:
        stored = values.astype({"F64": np.float64, "F32": np.float32, "F16": np.float16}[dtype.code])
        reference = stored
    counts = count_nonfinite(stored.view(np.uint8), dtype)
    assert counts is not None
    assert (counts.nan, counts.inf) == (int(np.isnan(reference).sum()), int(np.isinf(reference).sum()))
    assert count_nonfinite(np.zeros(16, np.float32).view(np.uint8), dtype) is None


def test_integers_are_not_counted() -> None:
    assert count_nonfinite(np.full(8, -1, np.int32).view(np.uint8), INT32) is None


# (unsigned view, exponent mask, mantissa mask, sign bit) of each format, written out here independently
LAYOUTS = {
    "F64": (np.uint64, 0x7FF0000000000000, 0x000FFFFFFFFFFFFF, 1 << 63),
    "F32": (np.uint32, 0x7F800000, 0x007FFFFF, 1 << 31),
    "F16": (np.uint16, 0x7C00, 0x03FF, 1 << 15),
    "BF16": (np.uint16, 0x7F80, 0x007F, 1 << 15),
}


def as_float(bits: np.ndarray, dtype: DType) -> np.ndarray:
    """The values the bits stand for, by numpy's own float types (bf16: the top half of a float32)."""
    if dtype is BFLOAT16:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view({"F64": np.float64, "F32": np.float32, "F16": np.float16}[dtype.code])


def reference(bits: np.ndarray, dtype: DType) -> NonFinite | None:
    values = as_float(bits, dtype)
    nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
    return NonFinite(nan, inf) if nan or inf else None


def random_finite_bits(rng: np.random.Generator, dtype: DType, size: int) -> np.ndarray:
    """Uniformly random bit patterns (both signs, subnormals, ±0, the largest finite values), each
    all-ones exponent made finite by clearing its lowest exponent bit."""
    width, exponent, _, _ = LAYOUTS[dtype.code]
    bits = rng.integers(0, np.iinfo(width).max, size, dtype=width, endpoint=True)
    special = (bits & width(exponent)) == width(exponent)
    bits[special] &= ~width(exponent & -exponent)
    return bits


def special_patterns(dtype: DType) -> dict[str, int]:
    _, exponent, mantissa, sign = LAYOUTS[dtype.code]
    return {
        "+inf": exponent,
        "-inf": sign | exponent,
        "+NaN, smallest payload": exponent | 1,
        "+NaN, largest payload": exponent | mantissa,
        "-NaN, smallest payload": sign | exponent | 1,
        "-NaN, all bits set": sign | exponent | mantissa,
        "+NaN, quiet bit only": exponent | (mantissa + 1) >> 1,
    }


@pytest.mark.parametrize("dtype", [FLOAT64, FLOAT32, FLOAT16, BFLOAT16])
def test_one_non_finite_value_in_any_block_is_found(dtype: DType) -> None:
    """Each NaN and infinity pattern, alone among random finite bits (the largest finite values of both
    signs included), in a random block and place: counted exactly as numpy's float arithmetic says."""
    rng, seed = fresh_rng()
    width, exponent, _, sign = LAYOUTS[dtype.code]
    size = 3 * BLOCK + int(rng.integers(1, BLOCK))
    bits = random_finite_bits(rng, dtype, size)
    bits[rng.integers(0, size, 50)] = width(exponent - 1)  # the largest finite value …
    bits[rng.integers(0, size, 50)] = width(sign | (exponent - 1))  # … and the most negative
    assert count_nonfinite(bits.view(np.uint8), dtype) is None, seed
    for kind, pattern in special_patterns(dtype).items():
        one = bits.copy()
        one[rng.integers(0, size)] = width(pattern)
        found = count_nonfinite(one.view(np.uint8), dtype)
        assert found == reference(one, dtype) and found is not None, (seed, kind, found)
        assert found.nan + found.inf == 1, (seed, kind, found)


@pytest.mark.parametrize("dtype", [FLOAT64, FLOAT32, FLOAT16, BFLOAT16])
def test_counts_match_float_arithmetic_on_random_bit_patterns(dtype: DType) -> None:
    """Blocks of raw random bits (many NaN and inf), blocks all finite, and blocks with a few of each."""
    rng, seed = fresh_rng()
    width = LAYOUTS[dtype.code][0]
    size = 4 * BLOCK + int(rng.integers(1, BLOCK))
    bits = random_finite_bits(rng, dtype, size)
    raw = rng.integers(0, np.iinfo(width).max, BLOCK, dtype=width, endpoint=True)
    start = int(rng.integers(0, size - BLOCK))
    bits[start : start + BLOCK // 2] = raw[: BLOCK // 2]  # unaligned with the blocks the count uses
    patterns = list(special_patterns(dtype).values())
    scattered = rng.integers(0, size, int(rng.integers(1, 40)))
    bits[scattered] = np.array(patterns, dtype=width)[rng.integers(0, len(patterns), scattered.size)]
    assert count_nonfinite(bits.view(np.uint8), dtype) == reference(bits, dtype), seed
    tail = bits[-int(rng.integers(1, 100)) :]
    assert count_nonfinite(tail.view(np.uint8), dtype) == reference(tail, dtype), seed
    assert count_nonfinite(bits[:0].view(np.uint8), dtype) is None


def _poisoned_copy(src: Path, dst: Path, value: float) -> str:
    shutil.copytree(src, dst)
    shard = next(p for p in sorted(dst.glob("*.safetensors")) if any(n.endswith("q_proj.weight") for n in load_file(p)))
    tensors = load_file(shard)
    name = sorted(n for n in tensors if n.endswith("q_proj.weight"))[0]
    tensors[name] = tensors[name].copy()
    tensors[name][0, :3] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    return name


def shard_of(folder: Path, name: str) -> Path:
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]


def _recipe(tmp_path: Path, a: Path, b: Path, extra: str = "") -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.5}}\n{extra}"
    )
    return recipe


def test_nan_input_is_reported_and_strict_refuses(
    tmp_path: Path, llama: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    name = _poisoned_copy(llama["math"], tmp_path / "math", float("nan"))
    recipe = _recipe(tmp_path, tmp_path / "math", llama["code"])
    with caplog.at_level(logging.WARNING, logger="gift_merge"):
        result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert f"tensor {name}: 3 NaN in the output (float32)" in caplog.text
    shard = shard_of(tmp_path / "math", name)
    assert f"{shard}: tensor {name}: 3 NaN in the input (4096 float32 values)" in caplog.text
    result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "strict"), "--strict"])
    assert result.exit_code == 2
    line = f"{shard}: tensor {name}: 3 NaN in the input (4096 float32 values); nothing was written (--strict)"
    assert result.output.splitlines()[-1] == f"error: {line}" and "Traceback" not in result.output
    assert not (tmp_path / "strict").exists()


# --- input tensors: counted once per run, in the reader, for both engines --------------------------------


def poison(rng: np.random.Generator, tensor: torch.Tensor) -> NonFinite:
    """Put a random number of NaN, +inf and -inf at random places of ``tensor`` (in place)."""
    flat = tensor.view(-1)
    nan, plus, minus = (int(rng.integers(0, 4)) for _ in range(3))
    nan = nan or (0 if plus or minus else 1)
    places = rng.choice(flat.numel(), nan + plus + minus, replace=False)
    flat[places[:nan]] = float("nan")
    flat[places[nan : nan + plus]] = float("inf")
    flat[places[nan + plus :]] = float("-inf")
    return NonFinite(nan, plus + minus)


def bf16_copy(source: Path, folder: Path) -> None:
    """``source`` with every tensor stored as bf16, in the same shards."""
    shutil.copytree(source, folder)
    for shard in folder.glob("*.safetensors"):
        save_torch({n: t.to(torch.bfloat16) for n, t in load_torch(shard).items()}, shard, metadata={"format": "pt"})


def poisoned_bf16_copy(
    rng: np.random.Generator, source: Path, folder: Path, tensors: int
) -> dict[tuple[Path, str], NonFinite]:
    """A bf16 copy of ``source`` with ``tensors`` random tensors poisoned: (shard, name) → what was put in."""
    bf16_copy(source, folder)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    chosen = rng.choice(sorted(weight_map), tensors, replace=False)
    planted = {}
    for name in chosen:
        shard = folder / weight_map[name]
        stored = load_torch(shard)
        planted[(shard, str(name))] = poison(rng, stored[name])
        save_torch(stored, shard, metadata={"format": "pt"})
    return planted


def input_line(shard: Path, name: str, counts: NonFinite, numel: int) -> str:
    return f"{shard}: tensor {name}: {counts} in the input ({numel} bfloat16 values)"


def test_reader_counts_a_tensor_once_however_often_and_wherever_it_is_read(
    tmp_path: Path, llama: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    rng, seed = fresh_rng()
    planted = poisoned_bf16_copy(rng, llama["math"], tmp_path / "math", 1)
    ((shard, name), counts), *_ = planted.items()
    calls: list[int] = []
    real = finite.count_nonfinite
    monkeypatch.setattr(finite, "count_nonfinite", lambda data, dtype: calls.append(data.size) or real(data, dtype))
    watch = InputWatch()
    reader = CheckpointReader(tmp_path / "math", watch=watch)
    other = CheckpointReader(tmp_path / "math", watch=watch)  # a second reader of one run: still once
    numel = reader.info(name).numel
    with ThreadPoolExecutor(8) as pool:  # the executor's workers read concurrently
        list(pool.map(lambda i: (reader, other)[i % 2].read(name) if i % 3 else reader.read_array(name), range(64)))
    assert calls == [2 * numel], seed
    assert watch.found == [input_line(shard, name, counts, numel)], seed
    clean = next(n for n in reader.names if (shard, n) not in planted and n != name)
    reader.read_array(clean)
    assert len(calls) == 2 and len(watch.found) == 1, seed  # a finite tensor is counted, and not reported
    with pytest.raises(GiftMergeError) as refused:
        CheckpointReader(tmp_path / "math", watch=InputWatch(strict=True)).read_array(name)
    assert str(refused.value) == f"{input_line(shard, name, counts, numel)}; nothing was written (--strict)", seed
    assert CheckpointReader(tmp_path / "math").read_array(name) is not None  # no watch: nothing counted
    assert len(calls) == 3, seed


def test_pickled_weights_are_counted_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng, seed = fresh_rng()
    folder = tmp_path / "pickled"
    folder.mkdir()
    weight = torch.from_numpy(rng.standard_normal((32, 16)).astype(np.float32)).to(torch.bfloat16)
    counts = poison(rng, weight)
    torch.save({"w": weight, "ids": torch.arange(4)}, folder / "pytorch_model.bin")
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")
    for read in ("read", "read_array"):
        watch = InputWatch()
        reader = CheckpointReader(folder, watch=watch)
        getattr(reader, read)("w")
        getattr(reader, read)("ids")
        assert watch.found == [
            f"{folder / 'pytorch_model.bin'}: tensor w: {counts} in the input (512 bfloat16 values)"
        ], seed


METHODS = {
    # elementwise: both engines read each input a block of rows at a time
    "linear": "merge_method: linear\nmodels:\n  - {{model: {math}, parameters: {{weight: 0.6}}}}\n  - {{model: {code}, parameters: {{weight: 0.4}}}}\n",
    # streamed with a base: whole flat inputs, magnitude selection
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n  - {{model: {math}, parameters: {{weight: 0.6, density: 0.5}}}}\n  - {{model: {code}, parameters: {{weight: 0.4, density: 0.7}}}}\n",
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_every_input_tensor_is_counted_once_per_run_by_either_engine(
    tmp_path: Path,
    llama: dict[str, Path],
    engine: str,
    method: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """bf16 inputs with random tensors poisoned, every tensor split into many blocks of rows: each input
    tensor is counted exactly once, each poisoned one reported once with its file and exact counts, and
    the output is byte for byte what a run without the count writes."""
    rng, seed = fresh_rng()
    models = {"math": tmp_path / "math", "code": tmp_path / "code", "base": tmp_path / "base"}
    planted = poisoned_bf16_copy(rng, llama["math"], models["math"], int(rng.integers(1, 3)))
    planted |= poisoned_bf16_copy(rng, llama["code"], models["code"], int(rng.integers(1, 3)))
    bf16_copy(llama["base"], models["base"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(METHODS[method].format(**models))
    monkeypatch.setattr(blocks, "CHUNK_FROM", 1)
    monkeypatch.setattr(blocks, "ELEMENTWISE_CHUNK", 777)
    monkeypatch.setenv(PROCESSES_ENV, "0")  # the counts are watched in this process's threads
    reads: list[tuple[Path, str]] = []
    counted: list[tuple[Path, str]] = []
    check, count, reading = InputWatch.check, finite.count_nonfinite, threading.local()

    def watched(self: InputWatch, file: Path, name: str, dtype: DType, data: np.ndarray) -> None:
        reads.append((file, name))
        reading.key = (file, name)  # the count runs in this thread, inside this call
        try:
            check(self, file, name, dtype, data)
        finally:
            reading.key = None  # the writer's output counts, in the same threads, are not input counts

    def counting(data: np.ndarray, dtype: DType) -> NonFinite | None:
        if getattr(reading, "key", None) is not None:
            counted.append(reading.key)
        return count(data, dtype)

    monkeypatch.setattr(InputWatch, "check", watched)
    monkeypatch.setattr(finite, "count_nonfinite", counting)
    with caplog.at_level(logging.WARNING, logger="gift_merge"):
        result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "out"), "--engine", engine, "-q"])
    assert result.exit_code == 0, (seed, result.output)
    inputs = [models["math"], models["code"]] + ([models["base"]] if method == "ties" else [])
    every = {(CheckpointReader(f).info(n).file, n) for f in inputs for n in CheckpointReader(f).names}
    assert set(reads) == every, seed  # every tensor the merge reads went through the watch …
    assert sorted(counted) == sorted(every), seed  # … and was counted exactly once
    lines = [r.getMessage() for r in caplog.records if " in the input " in r.getMessage()]
    expected = [
        input_line(shard, name, counts, CheckpointReader(shard.parent).info(name).numel)
        for (shard, name), counts in planted.items()
    ]
    assert sorted(line.split("; ")[0] for line in lines) == sorted(expected), seed
    monkeypatch.setattr(InputWatch, "check", lambda *args: None)
    result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "unwatched"), "--engine", engine, "-q"])
    assert result.exit_code == 0, (seed, result.output)
    assert digest(tmp_path / "out") == digest(tmp_path / "unwatched"), seed


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_a_non_finite_input_the_output_drops_is_reported_and_strict_refuses(
    tmp_path: Path, llama: dict[str, Path], engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows of a vocabulary tensor past the output's vocabulary are trimmed: NaN there never reaches the
    output, so only the input count shows that the model is damaged."""
    rng, seed = fresh_rng()
    padded = tmp_path / "padded"
    shutil.copytree(llama["math"], padded)
    name = "model.embed_tokens.weight"
    shard = shard_of(padded, name)
    stored = load_file(shard)
    rows, width = stored[name].shape
    extra = rng.standard_normal((int(rng.integers(1, 9)), width)).astype(np.float32)
    bad = rng.choice(extra.size, int(rng.integers(1, extra.size)), replace=False)
    extra.reshape(-1)[bad] = rng.choice([np.nan, np.inf, -np.inf], bad.size)
    counts = NonFinite(int(np.isnan(extra).sum()), int(np.isinf(extra).sum()))
    stored[name] = np.concatenate([stored[name], extra])
    save_file(stored, shard, metadata={"format": "pt"})
    recipe = _recipe(tmp_path, llama["code"], padded)  # the first model (the reference) sets the vocabulary
    line = f"{shard}: tensor {name}: {counts} in the input ({(rows + len(extra)) * width} float32 values)"
    with caplog.at_level(logging.WARNING, logger="gift_merge"):
        result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "out"), "--engine", engine])
    assert result.exit_code == 0, (seed, result.output)
    assert line in caplog.text and "in the output" not in caplog.text, seed
    merged = {n: a for f in (tmp_path / "out").glob("*.safetensors") for n, a in load_file(f).items()}
    assert merged[name].shape == (rows, width) and all(np.isfinite(a).all() for a in merged.values()), seed
    result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "strict"), "--engine", engine, "--strict"])
    assert result.exit_code == 2, (seed, result.output)
    assert result.output.splitlines()[-1] == f"error: {line}; nothing was written (--strict)", seed
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "padded", "r.yaml"], seed  # no partial output


def test_overflow_when_rounding_to_fp16_is_reported(
    tmp_path: Path, llama: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    name = _poisoned_copy(llama["math"], tmp_path / "math", 1.0e6)  # finite in fp32, past fp16's 65504
    recipe = _recipe(tmp_path, tmp_path / "math", llama["code"], "out_dtype: float16\n")
    with caplog.at_level(logging.WARNING, logger="gift_merge"):
        result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert f"tensor {name}: 3 ±inf in the output (float16)" in caplog.text
    assert "in the input" not in caplog.text  # the inputs are finite: only the rounding overflowed
    result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "strict"), "--strict"])
    assert result.exit_code == 2, result.output
    assert f"tensor {name}: 3 ±inf in the output (float16)" in result.output and "(--strict)" in result.output
    assert not (tmp_path / "strict").exists()


def test_extract_lora_names_the_module_with_non_finite_weights(tmp_path: Path, llama: dict[str, Path]) -> None:
    name = _poisoned_copy(llama["math"], tmp_path / "math", float("inf"))
    result = CliRunner().invoke(
        main,
        [
            "extract-lora",
            "--base",
            str(llama["base"]),
            "--tuned",
            str(tmp_path / "math"),
            "--rank",
            "2",
            str(tmp_path / "adapter"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert name.removesuffix(".weight") in result.output and "NaN or ±inf" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "adapter").exists()


def test_training_on_a_model_with_nan_weights_fails_in_one_line(tmp_path: Path, llama: dict[str, Path]) -> None:
    _poisoned_copy(llama["base"], tmp_path / "base", float("nan"))
    data = Path(__file__).resolve().parents[1] / "recipes" / "data" / "numina_cot_24.jsonl"
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--base",
            str(tmp_path / "base"),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "adapter"),
            "--mode",
            "sft",
            "--max-length",
            "64",
            "--batch-size",
            "4",
            "--grad-accum",
            "1",
            "--r",
            "2",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "step 1: the loss is nan" in result.output and "NaN or ±inf" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "adapter").exists()
