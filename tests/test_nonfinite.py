"""NaN and ±inf in an output tensor are reported with the tensor's name and count; ``--strict`` refuses."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from gift_merge.cli import main
from gift_merge.dtypes import BFLOAT16, FLOAT16, FLOAT32, FLOAT64, INT32
from gift_merge.io.finite import BLOCK, count_nonfinite


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


def _poisoned_copy(src: Path, dst: Path, value: float) -> str:
    shutil.copytree(src, dst)
    shard = next(p for p in sorted(dst.glob("*.safetensors")) if any(n.endswith("q_proj.weight") for n in load_file(p)))
    tensors = load_file(shard)
    name = sorted(n for n in tensors if n.endswith("q_proj.weight"))[0]
    tensors[name] = tensors[name].copy()
    tensors[name][0, :3] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    return name


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
    result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "strict"), "--strict"])
    assert result.exit_code == 2
    assert f"tensor {name}: 3 NaN in the output" in result.output and "nothing was written" in result.output
    assert not (tmp_path / "strict").exists()


def test_overflow_when_rounding_to_fp16_is_reported(
    tmp_path: Path, llama: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    name = _poisoned_copy(llama["math"], tmp_path / "math", 1.0e6)  # finite in fp32, past fp16's 65504
    recipe = _recipe(tmp_path, tmp_path / "math", llama["code"], "out_dtype: float16\n")
    with caplog.at_level(logging.WARNING, logger="gift_merge"):
        result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert f"tensor {name}: 3 ±inf in the output (float16)" in caplog.text


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
