"""Optimised paths give the same bytes as the plain whole-tensor path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from click.testing import CliRunner

import gift_merge.blocks as blocks
import gift_merge.execute as execute
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
    import gift_merge.operators.gta as gta

    recipe = tmp_path / "r.yaml"
    recipe.write_text(GTA.format(method=method, **llama))
    settings: dict[str, Patches] = {"whole": {(gta, "CHUNK"): 1 << 62}, "chunked": {(gta, "CHUNK"): 333}}
    outputs = outputs_under(settings, recipe, tmp_path, monkeypatch)
    assert outputs["whole"] == outputs["chunked"]


def test_della_ranks_blockwise_are_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from gift_merge.operators import kernels

    delta = torch.randn(37, 53, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).float()  # ties too
    whole = kernels.della_keep_probabilities(delta, 0.5, 0.1)
    monkeypatch.setattr(kernels, "DELLA_BLOCK", 100)  # one row per block (53 entries each)
    assert torch.equal(kernels.della_keep_probabilities(delta, 0.5, 0.1), whole)
    monkeypatch.setattr(kernels, "DELLA_BLOCK", 500)  # nine rows per block, last block short
    assert torch.equal(kernels.della_keep_probabilities(delta, 0.5, 0.1), whole)


@pytest.mark.parametrize("width", [53, 64, 1])  # odd rows (blocks rounded to even sizes), even rows, columns
@pytest.mark.parametrize("block", [100, 500, 1 << 18])
def test_della_mask_drawn_by_blocks_equals_one_whole_draw(
    width: int, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused mask takes the generator's raw draws in the same order as one tensor-sized draw."""
    import torch

    from gift_merge.operators import kernels
    from gift_merge.operators.base import generator_for

    delta = torch.randn(37, width, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).float()
    probs = kernels.della_keep_probabilities(delta, 0.5, 0.2)
    expected = kernels.uniform_like(probs, generator_for(7, "w")) < probs
    monkeypatch.setattr(kernels, "DELLA_BLOCK", block)
    generator = generator_for(7, "w")
    assert torch.equal(kernels.della_keep_mask(delta, 0.5, 0.2, generator), expected)
    assert (
        generator.bit_generator.random_raw()
        == generator_for(7, "w")
        .bit_generator.advance(  # type: ignore[attr-defined]
            (delta.numel() + 1) // 2
        )
        .random_raw()
    )  # and leaves the generator where the whole draw would


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
    import gift_merge.operators.gta as gta

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
    import gift_merge.operators.kernels as kernels

    monkeypatch.setattr(kernels, "_SAMPLE", 32)
    monkeypatch.setattr(kernels, "REDUCE_BLOCK", 96)  # L1 norms over many blocks, a short last one
    # streamed, the magnitude cuts also take the sampled selection (introselect when whole)
    settings: dict[str, Patches] = {
        "whole": {(blocks, "CHUNK_FROM"): 1 << 62, (gta, "CHUNK"): 1 << 18, (kernels, "_GUESS_FROM"): 1 << 62},
        "streamed": {(blocks, "CHUNK_FROM"): 1, (gta, "CHUNK"): 1000, (kernels, "_GUESS_FROM"): 64},
    }
    outputs = outputs_under(settings, recipe, tmp_path, monkeypatch)
    assert outputs["whole"] == outputs["streamed"]


def test_streamed_path_is_taken(tmp_path: Path, llama: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import gift_merge.operators.ties as ties

    calls = []
    real = ties.gta_stream
    monkeypatch.setattr(
        ties, "gta_stream", lambda stream, cut, consensus: calls.append(1) or real(stream, cut, consensus)
    )
    monkeypatch.setattr(blocks, "CHUNK_FROM", 1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GTA.format(method="ties", **llama))
    result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "out"), "-q", "--engine", "torch"])
    assert result.exit_code == 0
    assert len(calls) > 10


GLOBAL_STATISTICS = {
    "slerp": "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {math}\nparameters: {{t: [0.1, 0.8]}}\n",
    "slerp-instruct": "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {instruct}\nparameters: {{t: 0.3}}\n",
    "model_stock": "merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {math}\n  - model: {code}\n",
    "model_stock-rows": (
        "merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {math}\n  - model: {code}\n"
        "  - model: {instruct}\nparameters: {{filter_wise: true}}\ndtype: bfloat16\n"
    ),
}


@pytest.mark.parametrize("name", list(GLOBAL_STATISTICS))
def test_streamed_global_statistics_are_bit_identical(
    tmp_path: Path, llama: dict[str, Path], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """slerp and model_stock need whole-tensor inner products: streamed, they sum the same blocks."""
    import gift_merge.operators.gta as gta
    import gift_merge.operators.kernels as kernels

    recipe = tmp_path / "r.yaml"
    recipe.write_text(GLOBAL_STATISTICS[name].format(**llama))
    monkeypatch.setattr(kernels, "REDUCE_BLOCK", 96)  # many blocks, a short last one
    real_path = execute._Readers.path
    paths: list[str] = []
    monkeypatch.setattr(execute._Readers, "path", lambda self, job: paths.append(real_path(self, job)) or paths[-1])
    settings: dict[str, Patches] = {
        "whole": {(blocks, "CHUNK_FROM"): 1 << 62, (gta, "CHUNK"): 1 << 18},
        "streamed": {(blocks, "CHUNK_FROM"): 1, (gta, "CHUNK"): 1000},
    }
    outputs = {}
    for label, patches in settings.items():
        paths.clear()
        outputs |= outputs_under({label: patches}, recipe, tmp_path, monkeypatch)
        assert ("stream" in paths) == (label == "streamed")
    assert outputs["whole"] == outputs["streamed"]


def test_streamed_dare_rescale_sums_the_same_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The streamed DARE factor (no |δ| buffer) equals, as a float, the one the whole-tensor path computes."""
    import torch

    import gift_merge.operators.gta as gta
    import gift_merge.operators.kernels as kernels
    from gift_merge.operators.base import StreamInputs

    monkeypatch.setattr(kernels, "REDUCE_BLOCK", 96)
    g = torch.Generator().manual_seed(4)
    base = torch.randn(20_001, generator=g)  # float32 with full mantissas, so block sums do round
    tuned = base + torch.randn(20_001, generator=g) * 1e-2
    keep = torch.rand(20_001, generator=g) < 0.4
    stream = StreamInputs(tensors=[tuned], base=base, widen=lambda t: t.float(), out_dtype=torch.float32)
    delta = tuned.float() - base.float()
    whole = kernels.l1_factor(kernels.blocked_sum(delta.abs()), kernels.blocked_sum((delta * keep).abs()))
    assert gta._kept_l1_factor(stream, tuned, keep) == whole
