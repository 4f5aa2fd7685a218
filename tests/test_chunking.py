"""Optimised paths give the same bytes as the plain whole-tensor path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from click.testing import CliRunner

import gift_merge.engine.blocks as blocks
from gift_merge.cli import main

RECIPES = {
    "linear": "merge_method: linear\nmodels:\n  - {{model: {math}, parameters: {{weight: 0.7}}}}\n  - {{model: {code}, parameters: {{weight: [0.2, 0.9]}}}}\ndtype: bfloat16\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - {{model: {math}, parameters: {{weight: 0.7}}}}\n  - {{model: {code}, parameters: {{weight: -0.3}}}}\nparameters: {{lambda: 1.3}}\nout_dtype: float16\n",
    "nearswap": "merge_method: nearswap\nbase_model: {base}\nmodels:\n  - model: {math}\nparameters: {{t: 0.0005}}\n",
    "passthrough": "merge_method: passthrough\nmodels:\n  - {{model: {math}, parameters: {{scale: [{{filter: o_proj, value: 0}}, {{value: 1.5}}]}}}}\n",
}


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


Patches = dict[tuple[object, str], object]


def outputs_under(
    settings: dict[str, Patches], recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, dict[str, str]]:
    """Run ``recipe`` once per label with those module attributes patched: each output's shard digests."""
    outputs = {}
    for label, patches in settings.items():
        for (module, attribute), value in patches.items():
            monkeypatch.setattr(module, attribute, value)
        result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / label), "-q", "--engine", "torch"])
        assert result.exit_code == 0, result.output
        outputs[label] = digest(tmp_path / label)
    return outputs


@pytest.mark.parametrize("method", list(RECIPES))
def test_chunked_elementwise_path_is_bit_identical(
    tmp_path: Path, llama: dict[str, Path], method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPES[method].format(**llama))
    settings: dict[str, Patches] = {
        "whole": {(blocks, "CHUNK_FROM"): 1 << 62, (blocks, "ELEMENTWISE_CHUNK"): 1 << 19},
        "chunked": {(blocks, "CHUNK_FROM"): 1, (blocks, "ELEMENTWISE_CHUNK"): 777},
    }
    outputs = outputs_under(settings, recipe, tmp_path, monkeypatch)
    assert outputs["whole"] == outputs["chunked"]


GTA = "merge_method: {method}\nbase_model: {base}\nmodels:\n  - {{model: {math}, parameters: {{weight: 0.6, density: 0.5}}}}\n  - {{model: {code}, parameters: {{weight: 0.5, density: 0.7}}}}\ndtype: bfloat16\n"


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_chunked_task_arithmetic_stage_is_bit_identical(
    tmp_path: Path, llama: dict[str, Path], method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gift_merge.operators.base as operator_base

    recipe = tmp_path / "r.yaml"
    recipe.write_text(GTA.format(method=method, **llama))
    settings: dict[str, Patches] = {
        "whole": {(operator_base, "CHUNK"): 1 << 62},
        "chunked": {(operator_base, "CHUNK"): 334},
    }
    outputs = outputs_under(settings, recipe, tmp_path, monkeypatch)
    assert outputs["whole"] == outputs["chunked"]


@pytest.mark.parametrize("width", [53, 64, 1])  # odd rows (blocks rounded to even sizes), even rows, columns
@pytest.mark.parametrize("block", [100, 500, 1 << 18])
def test_della_mask_ranked_by_blocks_equals_one_whole_block(
    width: int, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks of rows take the generator's draws in the same order as one tensor-sized draw, and leave the
    generator where the whole draw would."""
    import numpy as np

    from gift_merge.dtypes import FLOAT32
    from gift_merge.engine.backend import NUMPY
    from gift_merge.operators import della
    from gift_merge.operators.base import Operands, Output, generator_for
    from tests.operators.operator_testing import ArraySource

    rng = np.random.default_rng(4)
    magnitude = np.abs(rng.standard_normal(37 * width).astype(np.float32) * 1e-3)
    magnitude = (magnitude.view(np.uint32) & 0xFFFF0000).view(np.float32)  # bf16 values: many ties

    def keep(rank_block: int) -> tuple[np.ndarray, int]:
        monkeypatch.setattr(della, "RANK_BLOCK", rank_block)
        operands = Operands(
            [ArraySource(magnitude)], ArraySource(np.zeros_like(magnitude)), (37, width), NUMPY,
            Output(NUMPY, magnitude.size, FLOAT32), generator=generator_for(7, "w"),
        )  # fmt: skip
        mask = della.keep_mask(operands, magnitude, 0.5, 0.2)
        assert operands.generator is not None
        return mask, int(operands.generator.bit_generator.random_raw())

    whole, after = keep(1 << 62)
    blocked, blocked_after = keep(block)
    assert np.array_equal(blocked, whole) and blocked_after == after


TIES_VARIANTS = {
    "default": "{{weight: 0.6, density: 0.5}}",
    "rescale": "{{weight: 0.6, density: 0.3}}\nparameters: {{rescale: true, normalize: false, lambda: 0.8}}",
    "tiny-density": "{{weight: 0.6, density: 0.001}}",
}


@pytest.mark.parametrize(
    "method", ["ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]
)
@pytest.mark.parametrize("variant", list(TIES_VARIANTS))
def test_streamed_trims_are_bit_identical(
    tmp_path: Path, llama: dict[str, Path], variant: str, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 inputs make many |δ| equal at the cut, so tie handling across slices is exercised too."""
    if method.startswith("della") and variant == "tiny-density":
        pytest.skip("della needs density ≥ epsilon")
    import gift_merge.operators.base as operator_base
    import gift_merge.operators.reductions as reductions

    first = TIES_VARIANTS[variant].split("\n")[0]
    rest = "\n".join(TIES_VARIANTS[variant].split("\n")[1:])
    text = (
        f"merge_method: {method}\nbase_model: {{base}}\nmodels:\n"
        f"  - {{{{model: {{math}}, parameters: {first}}}}}\n"
        "  - {{model: {code}, parameters: {{weight: 0.5, density: 1.0}}}}\n"
        f"dtype: bfloat16\n{rest}\n"
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text.format(**llama))
    import gift_merge.engine.selection as selection

    monkeypatch.setattr(selection, "_SAMPLE", 32)
    monkeypatch.setattr(reductions, "REDUCE_BLOCK", 96)  # L1 norms over many blocks, a short last one
    # streamed, the magnitude cuts also take the sampled selection (introselect when whole)
    whole = {(operator_base, "CHUNK"): 1 << 62, (selection, "_GUESS_FROM"): 1 << 62}
    streamed = {(operator_base, "CHUNK"): 1000, (selection, "_GUESS_FROM"): 64}
    settings: dict[str, Patches] = {
        "whole": {(blocks, "CHUNK_FROM"): 1 << 62, **whole},
        "streamed": {(blocks, "CHUNK_FROM"): 1, (blocks, "ELEMENTWISE_CHUNK"): 999, **streamed},
    }
    outputs = outputs_under(settings, recipe, tmp_path, monkeypatch)
    assert outputs["whole"] == outputs["streamed"]


GLOBAL_STATISTICS = {
    "slerp": "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {math}\nparameters: {{t: [0.1, 0.8]}}\n",
    "slerp-instruct": "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {instruct}\nparameters: {{t: 0.3}}\n",
    "model_stock": "merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {math}\n  - model: {code}\n",
    "model_stock-rows": (
        "merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {math}\n  - model: {code}\n"
        "  - model: {instruct}\nparameters: {{filter_wise: true}}\ndtype: bfloat16\n"
    ),
    "multislerp": (
        "merge_method: multislerp\nbase_model: {base}\nmodels:\n  - {{model: {math}, parameters: {{weight: 0.7}}}}\n"
        "  - {{model: {code}, parameters: {{weight: 0.4}}}}\ndtype: bfloat16\n"
    ),
    "karcher": "merge_method: karcher\nmodels:\n  - model: {math}\n  - model: {code}\n  - model: {instruct}\n",
    "arcee_fusion": "merge_method: arcee_fusion\nbase_model: {base}\nmodels:\n  - model: {math}\ndtype: bfloat16\n",
}


@pytest.mark.parametrize("name", list(GLOBAL_STATISTICS))
def test_streamed_global_statistics_are_bit_identical(
    tmp_path: Path, llama: dict[str, Path], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """slerp, model_stock, multislerp, karcher and arcee_fusion need whole-tensor sums (and arcee_fusion its
    quantiles): streamed, they sum the same blocks."""
    import gift_merge.operators.base as operator_base
    import gift_merge.operators.reductions as reductions

    recipe = tmp_path / "r.yaml"
    recipe.write_text(GLOBAL_STATISTICS[name].format(**llama))
    monkeypatch.setattr(reductions, "REDUCE_BLOCK", 96)  # many blocks, a short last one
    settings: dict[str, Patches] = {
        "whole": {(blocks, "CHUNK_FROM"): 1 << 62, (operator_base, "CHUNK"): 1 << 62},
        "streamed": {(blocks, "CHUNK_FROM"): 1, (operator_base, "CHUNK"): 1000},
    }
    outputs = outputs_under(settings, recipe, tmp_path, monkeypatch)
    assert outputs["whole"] == outputs["streamed"]


def test_streamed_dare_rescale_sums_the_same_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The streamed DARE factor (no |δ| buffer) equals, as a float, the one taken on a whole |δ| buffer."""
    import numpy as np

    import gift_merge.operators.reductions as reductions
    from gift_merge.dtypes import FLOAT32
    from gift_merge.engine.backend import NUMPY
    from gift_merge.operators.base import Operands, Output
    from gift_merge.operators.rescale import by_slice, masked_l1_factor, streamed_l1_factor
    from tests.operators.operator_testing import ArraySource

    monkeypatch.setattr(reductions, "REDUCE_BLOCK", 96)
    rng = np.random.default_rng(4)
    base = rng.standard_normal(20_001).astype(np.float32)  # full mantissas, so block sums do round
    tuned = base + (rng.standard_normal(20_001) * 1e-2).astype(np.float32)
    keep = rng.random(20_001) < 0.4
    operands = Operands([ArraySource(tuned)], ArraySource(base), (20_001,), NUMPY, Output(NUMPY, 20_001, FLOAT32))
    whole = masked_l1_factor(NUMPY, np.abs(tuned - base), keep)
    assert whole is not None and streamed_l1_factor(operands, operands.sources[0], by_slice(keep.__getitem__)) == whole
