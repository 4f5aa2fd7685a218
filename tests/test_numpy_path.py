"""Every method writes the same bytes on the numpy backend as on the torch backend (on the CPU), and a
merge on numpy never imports torch; bf16/fp16 rounding matches torch's bit for bit."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import gift_merge.engine.blocks as blocks
import gift_merge.engine.selection as selection
import gift_merge.operators.base as operator_base
import gift_merge.operators.reductions as reductions
from gift_merge.cli import main
from gift_merge.dtypes import BFLOAT16, FLOAT16, FLOAT32, DType
from gift_merge.engine.executor import choose_engine
from gift_merge.engine.floatbits import narrow, to_float32, widen
from gift_merge.merge import plan_recipe
from gift_merge.recipe import load_recipe
from gift_merge.toy.tiny_models import build_family
from tests.adapter_variants import VARIANTS
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
    "slerp": "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {math}\n"
    "parameters: {{t: [{{filter: self_attn, value: [0.1, 0.9]}}, {{value: 0.35}}]}}\n",
    "model_stock": "merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {math}\n  - model: {code}\n"
    "  - model: {instruct}\nout_dtype: bfloat16\n",
    "model_stock_rows": "merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {math}\n"
    "  - model: {code}\nparameters: {{filter_wise: true}}\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n"
    "  - {{model: {math}, parameters: {{weight: 0.6, density: 0.5}}}}\n"
    "  - {{model: {code}, parameters: {{weight: -0.5, density: [0.2, 0.9]}}}}\nparameters: {{lambda: 0.8}}\n",
    "ties_rescaled": "merge_method: ties\nbase_model: {base}\nmodels:\n"
    "  - {{model: {math}, parameters: {{weight: 1, density: 0.3}}}}\n  - {{model: {code}, parameters: {{weight: 0.7, density: 1}}}}\n"
    "  - {{model: {instruct}, parameters: {{weight: 0.2, density: 0.05}}}}\nparameters: {{rescale: true, normalize: false}}\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
    "  - {{model: {math}, parameters: {{weight: 0.6, density: 0.4}}}}\n  - {{model: {code}, parameters: {{weight: 0.5, density: 1.0}}}}\n"
    "  - {{model: {instruct}, parameters: {{weight: 0.3, density: 0.7}}}}\nout_dtype: bfloat16\n",
    "dare_linear": "merge_method: dare_linear\nbase_model: {base}\nmodels:\n"
    "  - {{model: {math}, parameters: {{weight: 0.6, density: 0.3}}}}\n  - {{model: {code}, parameters: {{weight: 0.4, density: 0.8}}}}\n"
    "parameters: {{normalize: true, rescale: false}}\n",
    "breadcrumbs": "merge_method: breadcrumbs\nbase_model: {base}\nmodels:\n"
    "  - {{model: {math}, parameters: {{weight: 0.6, density: 0.6, gamma: 0.05}}}}\n"
    "  - {{model: {code}, parameters: {{weight: 0.5, density: 0.9, gamma: 0.2}}}}\n",
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\nbase_model: {base}\nmodels:\n"
    "  - {{model: {math}, parameters: {{weight: 0.6, density: 0.5, gamma: 0.01}}}}\n"
    "  - {{model: {code}, parameters: {{weight: 0.5, density: 0.7}}}}\nparameters: {{rescale: true}}\n",
    "nearswap": "merge_method: nearswap\nbase_model: {base}\nmodels:\n  - model: {math}\nparameters: {{t: 0.0005}}\n",
    "della": "merge_method: della\nbase_model: {base}\nmodels:\n"
    "  - {{model: {math}, parameters: {{weight: 0.6, density: 0.5, epsilon: 0.2}}}}\n"
    "  - {{model: {code}, parameters: {{weight: 0.5, density: 0.7}}}}\nout_dtype: bfloat16\n",
    "della_linear": "merge_method: della_linear\nbase_model: {base}\nmodels:\n"
    "  - {{model: {math}, parameters: {{weight: 0.6, density: 0.4, epsilon: 0.1}}}}\n"
    "  - {{model: {code}, parameters: {{weight: 0.5, density: 0.8, epsilon: 0.05}}}}\nparameters: {{rescale: false}}\n",
    "sce": "merge_method: sce\nbase_model: {base}\nmodels:\n  - model: {math}\n  - model: {code}\n  - model: {instruct}\n"
    "parameters: {{select_topk: 0.6}}\n",
    "arcee_fusion": "merge_method: arcee_fusion\nbase_model: {base}\nmodels:\n  - model: {math}\nout_dtype: bfloat16\n",
    "ram": "merge_method: ram\nbase_model: {base}\nmodels:\n  - model: {math}\n  - model: {code}\n  - model: {instruct}\n"
    "parameters: {{epsilon: 0.001}}\n",
    "ramplus_tl": "merge_method: ramplus_tl\nbase_model: {base}\nmodels:\n  - model: {math}\n  - model: {code}\n"
    "  - model: {instruct}\nparameters: {{epsilon: 0.0008, r: 0.5, alpha: 2.0}}\n",
    "nuslerp": "merge_method: nuslerp\nmodels:\n  - {{model: {math}, parameters: {{weight: 0.3}}}}\n"
    "  - {{model: {code}, parameters: {{weight: 0.9}}}}\nparameters: {{nuslerp_flatten: false}}\n",
    "nuslerp_columns": "merge_method: nuslerp\nbase_model: {base}\nmodels:\n  - {{model: {math}, parameters: {{weight: 1}}}}\n"
    "  - {{model: {code}, parameters: {{weight: 2}}}}\nparameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}\n",
    "multislerp": "merge_method: multislerp\nbase_model: {base}\nmodels:\n  - {{model: {math}, parameters: {{weight: 0.2}}}}\n"
    "  - {{model: {code}, parameters: {{weight: 0.5}}}}\n  - {{model: {instruct}, parameters: {{weight: 0.3}}}}\n",
    "karcher": "merge_method: karcher\nmodels:\n  - model: {math}\n  - model: {code}\n  - model: {instruct}\n"
    "parameters: {{max_iter: 5}}\n",
    "tsv": "merge_method: tsv\nbase_model: {base}\nmodels:\n  - {{model: {math}, parameters: {{weight: 0.8}}}}\n"
    "  - model: {code}\n  - model: {instruct}\nparameters: {{alpha: 1.2}}\nout_dtype: bfloat16\n",
    "iso_c": "merge_method: iso_c\nbase_model: {base}\nmodels:\n  - model: {math}\n  - model: {code}\nparameters: {{alpha: 1.5}}\n",
    "iso_cts": "merge_method: iso_cts\nbase_model: {base}\nmodels:\n  - model: {math}\n  - model: {code}\n  - model: {instruct}\n"
    "parameters: {{common_space_fraction: 0.6}}\n",
    "passthrough": "merge_method: passthrough\nslices:\n  - sources: [{{model: {math}, layer_range: [0, 2]}}]\n"
    "  - sources: [{{model: {code}, layer_range: [1, 3], parameters: {{scale: [{{filter: o_proj, value: 0}}, "
    "{{value: 1.5}}]}}}}]\n",
}


@pytest.fixture(scope="module", params=["float32", "bfloat16", "float16"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dtype = getattr(torch, request.param)
    return build_family(tmp_path_factory.mktemp(request.param), "llama", seed=11, dtype=dtype)


@pytest.mark.parametrize("blocked", [False, True], ids=["whole", "blocks"])
@pytest.mark.parametrize("method", list(RECIPES))
def test_numpy_path_writes_the_torch_paths_bytes(
    tmp_path: Path, family: dict[str, Path], method: str, blocked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against torch's whole-tensor path, and against its row blocks and streams with small blocks that
    end mid-row (the numpy engine streams every size, so its own blocks are small here too)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPES[method].format(**family))
    assert choose_engine(plan_recipe(load_recipe(recipe))[-1], "cpu") == "numpy"
    if blocked:
        monkeypatch.setattr(blocks, "CHUNK_FROM", 1)
        monkeypatch.setattr(blocks, "ELEMENTWISE_CHUNK", 999)
    monkeypatch.setattr(operator_base, "CHUNK", 1000)
    monkeypatch.setattr(reductions, "REDUCE_BLOCK", 1 << 10)
    monkeypatch.setattr(selection, "_GUESS_FROM", 64)  # the sampled selection, on tiny tensors too
    monkeypatch.setattr(selection, "_SAMPLE", 32)
    assert_engines_agree(recipe, tmp_path)


def assert_engines_agree(recipe: Path, tmp_path: Path) -> None:
    outputs = {}
    for engine in ("torch", "numpy"):
        result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / engine), "-q", "--engine", engine])
        assert result.exit_code == 0, result.output
        outputs[engine] = digest(tmp_path / engine)
    assert outputs["numpy"] == outputs["torch"]
    assert outputs["numpy"]  # something was written


NUMPY_VARIANTS = ["plain", "rslora-patterns", "gpt2-conv1d", "qwen2-bias", "llama-embedding-delta-only"]
"""Adapters whose every patch is a delta independent of the weight (LoRA, rsLoRA with patterns, Conv1D,
LoRA bias, embedding LoRA); the others change the weight relative to itself and stay on torch."""


@pytest.fixture(scope="module")
def delta_adapters(adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared adapters, plus the embedding LoRA without the copy of the embedding that peft saves
    beside it (which makes its patch replace the weight): the only way to reach the transposed product."""
    embedding = tmp_path_factory.mktemp("delta-only") / "adapter"
    shutil.copytree(adapters["llama-embedding"], embedding)
    weights = embedding / "adapter_model.safetensors"
    kept = {k: v for k, v in load_file(weights).items() if not k.endswith("base_layer.weight")}
    save_file(kept, weights)
    return adapters | {"llama-embedding-delta-only": embedding}


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "row-blocks"])
@pytest.mark.parametrize("variant", NUMPY_VARIANTS)
def test_adapter_transfers_write_the_torch_paths_bytes(
    tmp_path: Path,
    families: dict[str, dict[str, Path]],
    delta_adapters: dict[str, Path],
    variant: str,
    streamed: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gift with λ ≠ 1 (fp32 math) and ``model+adapter`` under passthrough (fp64, as the planner asks for
    patched inputs), whole and in blocks of rows."""
    if streamed:
        monkeypatch.setattr(blocks, "CHUNK_FROM", 1)
        monkeypatch.setattr(blocks, "ELEMENTWISE_CHUNK", 200)
    instruct = families[VARIANTS[variant.removesuffix("-delta-only")][0]]["instruct"]
    assert_transfers_agree(tmp_path, instruct, delta_adapters[variant], "out_dtype: bfloat16\n")


def assert_transfers_agree(tmp_path: Path, instruct: Path, adapter: Path, extra: str = "") -> None:
    """gift (λ 0.7) and ``model+adapter`` under passthrough run on numpy and write the torch backend's bytes."""
    texts = {
        "gift": f"merge_method: gift\nbase_model: {instruct}\nmodels:\n  - model: {adapter}\n"
        f"    parameters: {{weight: 0.7}}\n{extra}",
        "patched": f"merge_method: passthrough\nmodels:\n  - model: {instruct}+{adapter}\n",
    }
    for name, text in texts.items():
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(text)
        assert choose_engine(plan_recipe(load_recipe(recipe))[-1], "cpu") == "numpy"
        assert_engines_agree(recipe, tmp_path / name)


@pytest.mark.parametrize("variant", ["dora", "modules-to-save", "llama-embedding"])
def test_patches_relative_to_the_weight_write_the_torch_backends_bytes(
    tmp_path: Path, families: dict[str, dict[str, Path]], adapters: dict[str, Path], variant: str
) -> None:
    """DoRA, modules_to_save and saved base layers are formed on the whole weight, on numpy too."""
    assert_transfers_agree(tmp_path, families[VARIANTS[variant][0]]["instruct"], adapters[variant])


@pytest.mark.parametrize(
    "method", ["linear", "dare_ties", "model_stock", "della", "sce", "nuslerp", "karcher", "tsv", "iso_c", "iso_cts"]
)
def test_a_merge_on_numpy_never_imports_torch(tmp_path: Path, llama: dict[str, Path], method: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPES[method].format(**llama))
    code = (
        "import sys\nfrom gift_merge.cli import main\n"
        f"try:\n    main(['run', {str(recipe)!r}, {str(tmp_path / 'out')!r}, '-q'])\nexcept SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", result.stderr
    assert digest(tmp_path / "out")


def float8_copy(source: Path, target: Path) -> Path:
    """``source`` with one matrix stored as float8 (e4m3), which only the torch backend reads."""
    shutil.copytree(source, target)
    for shard in target.glob("*.safetensors"):
        tensors = load_file(shard)
        for name in tensors:
            if name.endswith("mlp.up_proj.weight"):
                tensors[name] = tensors[name].to(torch.float8_e4m3fn)
        save_file(tensors, shard, metadata={"format": "pt"})
    return target


def test_plan_says_which_engine_runs(tmp_path: Path, llama: dict[str, Path]) -> None:
    della = tmp_path / "della.yaml"
    della.write_text(RECIPES["della"].format(**llama))
    assert "# engine on the CPU: numpy\n" in CliRunner().invoke(main, ["plan", str(della)]).output
    fp8 = {**llama, "math": float8_copy(llama["math"], tmp_path / "fp8")}
    recipe = tmp_path / "fp8.yaml"
    recipe.write_text(RECIPES["linear"].format(**fp8))
    planned = CliRunner().invoke(main, ["plan", str(recipe)])
    assert planned.exit_code == 0, planned.output
    assert "# engine on the CPU: torch (tensor " in planned.output and "stores float8_e4m3fn)" in planned.output


def test_run_says_why_it_needs_torch_unless_quiet(tmp_path: Path, llama: dict[str, Path]) -> None:
    fp8 = {**llama, "math": float8_copy(llama["math"], tmp_path / "fp8")}
    recipe = tmp_path / "fp8.yaml"
    recipe.write_text(RECIPES["linear"].format(**fp8))
    command = [sys.executable, "-m", "gift_merge.cli", "run", str(recipe), str(tmp_path / "out"), "--overwrite"]
    loud = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "merging with torch: tensor " in loud.stderr and "float8_e4m3fn" in loud.stderr
    quiet = subprocess.run([*command, "-q"], capture_output=True, text=True, check=True)
    assert quiet.stderr == "" and quiet.stdout == ""
    forced = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "torch"), "-q", "--engine", "torch"])
    assert forced.exit_code == 0, forced.output
    assert digest(tmp_path / "torch") == digest(tmp_path / "out")  # numpy and torch jobs mixed: the same bytes
