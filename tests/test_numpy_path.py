"""The torch-free numpy path writes the same bytes as the torch path, and runs without importing torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import gift_merge.numpy_engine as numpy_engine
from gift_merge.cli import main
from gift_merge.dtypes import BFLOAT16, FLOAT16, FLOAT32, DType
from gift_merge.errors import GiftMergeError
from gift_merge.execute import choose_engine
from gift_merge.floatbits import narrow, to_float32, widen
from gift_merge.merge import plan_recipe
from gift_merge.recipe import load_recipe
from gift_merge.tiny_models import build_adapter, build_family
from tests.test_chunking import digest


def awkward_floats(seed: int) -> np.ndarray:
    """Random values plus every case rounding can get wrong: ties to even both ways, NaNs (several
    payloads, both signs), ±inf, overflow to inf, subnormals, ±0; an odd length for the vector tails."""
    rng = np.random.default_rng(seed)
    normal = (rng.standard_normal(4099) * 10.0 ** rng.integers(-6, 6, 4099)).astype(np.float32)
    ties = ((rng.integers(0, 1 << 15, 64, dtype=np.uint32) << 16) | 0x8000).view(np.float32)  # exactly halfway
    special = np.array(
        [np.nan, -np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45, -1e-45, 1e-39, 0.0, -0.0, 65520.0, 6e-8],
        dtype=np.float32,
    )
    payloads = np.array([0x7F800001, 0xFFC00001, 0x7FFFFFFF], dtype=np.uint32).view(np.float32)
    return np.concatenate([normal, ties, special, payloads])


def torch_bits(values: np.ndarray, dtype: DType) -> np.ndarray:
    converted = torch.from_numpy(values).to(dtype.torch)
    if dtype == BFLOAT16:
        converted = converted.view(torch.int16)
    return converted.numpy().view(dtype.storage)


@pytest.mark.parametrize("dtype", [BFLOAT16, FLOAT16, FLOAT32], ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_rounding_matches_torch(dtype: DType, seed: int) -> None:
    values = awkward_floats(seed)
    ours = narrow(values, dtype)
    assert ours.dtype == dtype.storage
    np.testing.assert_array_equal(ours, torch_bits(values, dtype))


@pytest.mark.parametrize("dtype", [BFLOAT16, FLOAT16], ids=str)
def test_widening_matches_torch(dtype: DType) -> None:
    bits = torch_bits(awkward_floats(2), dtype)
    stored = torch.from_numpy(bits.view(np.int16)).view(dtype.torch) if dtype == BFLOAT16 else torch.from_numpy(bits)
    expected = stored.to(torch.float32).numpy()
    ours = widen(bits, dtype)
    nan = np.isnan(expected)
    assert nan.any() and np.array_equal(np.isnan(ours), nan)  # a NaN's payload is the CPU's business
    np.testing.assert_array_equal(ours[~nan].view(np.uint32), expected[~nan].view(np.uint32))


@pytest.mark.parametrize(("stored", "load"), [(FLOAT32, BFLOAT16), (FLOAT32, FLOAT16), (BFLOAT16, FLOAT16)], ids=str)
def test_load_dtype_rounds_as_torch_does(stored: DType, load: DType) -> None:
    bits = torch_bits(awkward_floats(3), stored)
    as_torch = (
        torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16) if stored == BFLOAT16 else torch.from_numpy(bits)
    )
    expected = as_torch.to(load.torch).to(torch.float32).numpy()
    ours = to_float32(bits, stored, load)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(ours), nan)
    np.testing.assert_array_equal(ours[~nan].view(np.uint32), expected[~nan].view(np.uint32))


RECIPES = {
    "linear": "merge_method: linear\nmodels:\n  - {{model: {math}, parameters: {{weight: 0.7}}}}\n"
    "  - {{model: {code}, parameters: {{weight: [0.2, 0.9]}}}}\n  - {{model: {instruct}, parameters: {{weight: -0.35}}}}\n",
    "linear_sum": "merge_method: linear\nmodels:\n  - {{model: {math}, parameters: {{weight: 0.61}}}}\n"
    "  - {{model: {code}, parameters: {{weight: 0.77}}}}\nparameters: {{normalize: false}}\nout_dtype: float16\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
    "  - {{model: {math}, parameters: {{weight: 0.7}}}}\n  - {{model: {code}, parameters: {{weight: -0.3}}}}\n"
    "parameters: {{lambda: 1.3}}\n",
    "task_arithmetic_normalized": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
    "  - {{model: {math}, parameters: {{weight: [0.1, 0.8]}}}}\n  - {{model: {code}, parameters: {{weight: 0.45}}}}\n"
    "parameters: {{normalize: true}}\ndtype: bfloat16\nout_dtype: float32\n",
    "passthrough": "merge_method: passthrough\nslices:\n  - sources: [{{model: {math}, layer_range: [0, 2]}}]\n"
    "  - sources: [{{model: {code}, layer_range: [1, 3], parameters: {{scale: [{{filter: o_proj, value: 0}}, "
    "{{value: 1.5}}]}}}}]\n",
}


@pytest.fixture(scope="module", params=["float32", "bfloat16", "float16"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dtype = getattr(torch, request.param)
    return build_family(tmp_path_factory.mktemp(request.param), "llama", seed=11, dtype=dtype)


@pytest.mark.parametrize("method", list(RECIPES))
def test_numpy_path_writes_the_torch_paths_bytes(
    tmp_path: Path, family: dict[str, Path], method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPES[method].format(**family))
    assert choose_engine(plan_recipe(load_recipe(recipe))[-1], "cpu") == "numpy"
    monkeypatch.setattr(numpy_engine, "CHUNK", 999)  # blocks that end mid-row and mid-vector
    outputs = {}
    for engine in ("torch", "numpy"):
        result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / engine), "-q", "--engine", engine])
        assert result.exit_code == 0, result.output
        outputs[engine] = digest(tmp_path / engine)
    assert outputs["numpy"] == outputs["torch"]
    assert outputs["numpy"]  # something was written


def test_engine_choice_says_why_numpy_cannot_run(tmp_path: Path, llama: dict[str, Path]) -> None:
    ties = tmp_path / "ties.yaml"
    ties.write_text(f"merge_method: ties\nbase_model: {llama['base']}\nmodels:\n  - model: {llama['math']}\n"
                    "    parameters: {weight: 1, density: 0.5}\n")  # fmt: skip
    plan = plan_recipe(load_recipe(ties))[-1]
    assert choose_engine(plan, "cpu") == "torch"
    with pytest.raises(GiftMergeError, match="ties has no numpy kernel"):
        choose_engine(plan, "cpu", "numpy")
    linear = tmp_path / "linear.yaml"
    linear.write_text(RECIPES["linear"].format(**llama))
    plan = plan_recipe(load_recipe(linear))[-1]
    assert choose_engine(plan, "cpu") == "numpy"
    assert choose_engine(plan, "cpu", "torch") == "torch"
    assert choose_engine(plan, "cuda") == "torch"
    result = CliRunner().invoke(main, ["run", str(ties), str(tmp_path / "out"), "-q", "--engine", "numpy"])
    assert result.exit_code == 2
    assert "--engine numpy: ties has no numpy kernel" in result.output
    assert not (tmp_path / "out").exists()


def test_a_merge_with_an_adapter_runs_on_torch(tmp_path: Path, llama: dict[str, Path]) -> None:
    adapter = build_adapter(llama["base"], tmp_path / "adapter", seed=5)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {llama['math']}+{adapter}\n  - model: {llama['code']}\n"
        "parameters: {weight: 0.5}\n"
    )
    plan = plan_recipe(load_recipe(recipe))[-1]
    with pytest.raises(GiftMergeError, match="carries an adapter"):
        choose_engine(plan, "cpu", "numpy")


def test_linear_merge_never_imports_torch(tmp_path: Path, llama: dict[str, Path]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPES["linear"].format(**llama))
    code = (
        "import sys\nfrom gift_merge.cli import main\n"
        f"try:\n    main(['run', {str(recipe)!r}, {str(tmp_path / 'out')!r}, '-q'])\nexcept SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", result.stderr
    assert digest(tmp_path / "out")
