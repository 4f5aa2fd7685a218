"""Planning: everything that can be wrong with a recipe fails here, naming the tensor or model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gift_merge.errors import GiftMergeError
from gift_merge.merge import plan_recipe
from gift_merge.recipe import parse_recipe
from tests import reference as ref


def plan(text: str, folder: Path):
    return plan_recipe(parse_recipe(text, folder=folder))[-1]


def rewrite(folder: Path, change) -> Path:
    tensors = ref.load_all(folder)
    change(tensors)
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_base_is_an_implicit_input(tmp_path: Path, llama: dict[str, Path]) -> None:
    text = f"merge_method: ties\nbase_model: {llama['base']}\nmodels:\n  - {{model: {llama['math']}, parameters: {{weight: 1}}}}\n"
    p = plan(text, tmp_path)
    job = p.jobs[0]
    assert job.base is not None and job.base.model == str(llama["base"])
    assert [s.model for s in job.inputs] == [str(llama["math"])]
    assert job.params["normalize"] is True  # ties' default, as in mergekit


def test_method_needing_a_base_without_one(tmp_path: Path, llama: dict[str, Path]) -> None:
    text = f"merge_method: task_arithmetic\nmodels:\n  - {{model: {llama['math']}, parameters: {{weight: 1}}}}\n"
    with pytest.raises(GiftMergeError, match="needs a base_model"):
        plan(text, tmp_path)


def test_shape_mismatch_names_tensor_and_model(tmp_path: Path, llama: dict[str, Path]) -> None:
    odd = shutil.copytree(llama["code"], tmp_path / "odd")
    rewrite(odd, lambda t: t.__setitem__("model.norm.weight", torch.ones(65)))
    text = f"merge_method: linear\nmodels:\n  - {{model: {llama['math']}, parameters: {{weight: 1}}}}\n  - {{model: {odd}, parameters: {{weight: 1}}}}\n"
    with pytest.raises(GiftMergeError, match=r"tensor model\.norm\.weight: .*odd has shape \[65\], expected \[64\]"):
        plan(text, tmp_path)


def test_missing_tensor_names_model(tmp_path: Path, llama: dict[str, Path]) -> None:
    odd = shutil.copytree(llama["code"], tmp_path / "odd")
    rewrite(odd, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    text = f"merge_method: linear\nmodels:\n  - {{model: {llama['math']}, parameters: {{weight: 1}}}}\n  - {{model: {odd}, parameters: {{weight: 1}}}}\n"
    with pytest.raises(GiftMergeError, match=r"odd has no tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        plan(text, tmp_path)


def test_larger_vocab_is_trimmed_to_the_base_with_a_warning(tmp_path: Path, llama: dict[str, Path]) -> None:
    big = shutil.copytree(llama["code"], tmp_path / "big")

    def grow(t: dict[str, torch.Tensor]) -> None:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            t[name] = torch.cat([t[name], torch.randn(8, t[name].shape[1])])

    rewrite(big, grow)
    text = f"merge_method: task_arithmetic\nbase_model: {llama['base']}\nmodels:\n  - {{model: {big}, parameters: {{weight: 1}}}}\n"
    p = plan(text, tmp_path)
    embed = next(j for j in p.jobs if j.name == "model.embed_tokens.weight")
    vocab = ref.load_all(llama["base"])["model.embed_tokens.weight"].shape[0]
    assert embed.rows == vocab and embed.shape[0] == vocab
    assert any(f"big has {vocab + 8} rows" in w for w in p.warnings)
    small = shutil.copytree(llama["base"], tmp_path / "small")
    rewrite(small, lambda t: t.__setitem__("lm_head.weight", t["lm_head.weight"][:300].clone()))
    text = f"merge_method: task_arithmetic\nbase_model: {llama['base']}\nmodels:\n  - {{model: {small}, parameters: {{weight: 1}}}}\n"
    with pytest.raises(GiftMergeError, match=r"lm_head\.weight: .*small has shape"):
        plan(text, tmp_path)


def test_models_with_different_depths_need_slices(tmp_path: Path, llama: dict[str, Path]) -> None:
    from gift_merge.toy.tiny_models import build_model

    deep = build_model(tmp_path / "deep", "llama", seed=3, num_layers=4, tokenizer_dir=llama["base"])
    text = f"merge_method: linear\nmodels:\n  - {{model: {llama['math']}, parameters: {{weight: 1}}}}\n  - {{model: {deep}, parameters: {{weight: 1}}}}\n"
    with pytest.raises(GiftMergeError, match="different layer counts"):
        plan(text, tmp_path)


def test_layer_range_beyond_the_model(tmp_path: Path, llama: dict[str, Path]) -> None:
    text = (
        f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {llama['math']}, layer_range: [0, 9]}}\n"
    )
    with pytest.raises(GiftMergeError, match=r"slices\[0\]\.sources\[0\]\.layer_range: .* has 3 layers"):
        plan(text, tmp_path)


def test_operator_model_counts(tmp_path: Path, llama: dict[str, Path]) -> None:
    text = (
        f"merge_method: slerp\nbase_model: {llama['base']}\nparameters: {{t: 0.5}}\nmodels:\n"
        f"  - model: {llama['math']}\n  - model: {llama['code']}\n"
    )
    with pytest.raises(GiftMergeError, match="slerp takes 1 input model"):
        plan(text, tmp_path)


def test_non_float_tensors_are_copied(tmp_path: Path, llama: dict[str, Path]) -> None:
    with_buffer = shutil.copytree(llama["math"], tmp_path / "buf")
    rewrite(with_buffer, lambda t: t.__setitem__("model.rotary.ids", torch.arange(5)))
    text = f"merge_method: linear\nmodels:\n  - {{model: {with_buffer}, parameters: {{weight: 2}}}}\n"
    job = next(j for j in plan(text, tmp_path).jobs if j.name == "model.rotary.ids")
    assert job.copy and job.out_dtype.torch == torch.int64
