"""Whole merges of tiny sharded Llama, Qwen2 and GPT-2 families, loaded back into transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from gift_merge.cli import main
from tests import reference as ref

RECIPE = """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {math}
    parameters: {{weight: 0.7}}
  - model: {code}
    parameters: {{weight: [0.2, 0.6]}}
parameters: {{lambda: 0.9}}
dtype: bfloat16
"""


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_sharded_merge_loads_and_generates(tmp_path: Path, families: dict[str, dict[str, Path]], arch: str) -> None:
    fam = families[arch]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(**{k: str(v) for k, v in fam.items()}))
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["run", str(recipe), str(out), "--out-shard-size", "60KB", "--quiet"])
    assert result.exit_code == 0, result.output

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    merged = ref.load_all(out)
    base = ref.load_all(fam["base"])
    assert set(merged) == set(base)  # tied models keep lm_head tied: no extra tensor appears
    config = json.loads((out / "config.json").read_text())
    layer_key = "n_layer" if arch == "gpt2" else "num_hidden_layers"
    n = config[layer_key]
    math, code = ref.load_all(fam["math"]), ref.load_all(fam["code"])
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        layer = next((int(p) for p in name.split(".") if p.isdigit()), None)
        t = layer / (n - 1) if layer is not None else 0.0
        w2 = 0.2 + 0.4 * t
        b = ref.f64(base[name], torch.bfloat16)
        d1 = ref.f64(math[name], torch.bfloat16) - b
        d2 = ref.f64(code[name], torch.bfloat16) - b
        ref.assert_close(tensor, b + 0.9 * (0.7 * d1 + w2 * d2), torch.bfloat16, name)

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "add 2 and 3"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 4
    assert (out / "README.md").read_text().count("task_arithmetic") >= 1
    assert (out / "gift_merge_recipe.yaml").read_text() == recipe.read_text()


def test_lm_head_of_a_tied_input_is_its_embedding(tmp_path: Path, families: dict[str, dict[str, Path]]) -> None:
    """A tied model merged into an untied one contributes its input embedding as lm_head (as in mergekit)."""
    import shutil

    from safetensors.torch import save_file

    llama = families["llama"]
    tied = tmp_path / "tied"
    shutil.copytree(llama["code"], tied)
    tensors = ref.load_all(tied)
    tensors.pop("lm_head.weight")
    for f in tied.glob("model*.safetensors*"):
        f.unlink()
    save_file(tensors, str(tied / "model.safetensors"), metadata={"format": "pt"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - {{model: {llama['math']}, parameters: {{weight: 1}}}}\n"
        f"  - {{model: {tied}, parameters: {{weight: 1}}}}\n"
    )
    result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    merged = ref.load_all(tmp_path / "out")
    math = ref.load_all(llama["math"])
    expected = (ref.f64(math["lm_head.weight"]) + ref.f64(tensors["model.embed_tokens.weight"])) / 2
    ref.assert_close(merged["lm_head.weight"], expected, torch.float32, "lm_head.weight")
