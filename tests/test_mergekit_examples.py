"""mergekit's own example recipes, rewritten onto tiny local models, give what their semantics imply.

The recipes are mergekit's ``examples/*.yml`` with only the model names changed (orca → math,
platypus → code, WizardMath → instruct, Llama-2 → base) and layer ranges shrunk to the tiny models'
three layers. Expected tensors come from float64 formulas in ``tests/reference.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gift_merge.cli import main
from tests import reference as ref

N_LAYERS = 3


def layer_t(name: str) -> float:
    """mergekit's t: k/(L-1) for layer k; embeddings, final norm and lm_head at t = 0."""
    match = re.search(r"\.layers\.(\d+)\.", name)
    return int(match.group(1)) / (N_LAYERS - 1) if match else 0.0


def run_recipe(tmp_path: Path, models: dict[str, Path], text: str, *extra: str) -> Path:
    for key, path in models.items():
        text = text.replace(f"<{key}>", str(path))
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(text)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(recipe), str(out), "--quiet", *extra])
    assert result.exit_code == 0, result.output
    return out


LINEAR = """
models:
  - model: <math>
    parameters:
      weight: 1.0
  - model: <instruct>
    parameters:
      weight: 0.3
  - model: <code>
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""


def test_linear_example(tmp_path: Path, llama: dict[str, Path]) -> None:
    out = run_recipe(tmp_path, llama, LINEAR)
    merged = ref.load_all(out)
    inputs = [ref.load_all(llama[k]) for k in ("math", "instruct", "code")]
    assert set(merged) == set(inputs[0])
    for name, tensor in merged.items():
        assert tensor.dtype == torch.float16
        thetas = [ref.f64(m[name], torch.float16) for m in inputs]
        ref.assert_close(tensor, ref.linear(thetas, [1.0, 0.3, 0.5]), torch.float16, name)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


TIES = """
models:
  - model: <math>
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: <code>
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: <instruct>
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: <base>
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def test_ties_example_with_gradients_and_filters(tmp_path: Path, llama: dict[str, Path]) -> None:
    out = run_recipe(tmp_path, llama, TIES)
    merged = ref.load_all(out)
    base = ref.load_all(llama["base"])
    models = [ref.load_all(llama[k]) for k in ("math", "code", "instruct")]
    for name, tensor in merged.items():
        t = layer_t(name)
        weights = [1.0, ref.interp([0, 0.3, 0.7, 1], t), 0.5 if "mlp" in name else 0.0]
        densities = [ref.interp([1, 0.7, 0.1], t), 0.5, 0.33]
        expected, ambiguous = ref.ties(
            ref.f64(base[name], torch.float16),
            [ref.f64(m[name], torch.float16) for m in models],
            weights,
            densities,
        )
        ref.assert_close(tensor, expected, torch.float16, name, skip=ambiguous)
    # t = 0 outside the layers: code's weight is 0 and instruct's is 0 (no "mlp"), math keeps density 1
    embed = "model.embed_tokens.weight"
    expected = ref.f64(models[0][embed], torch.float16)
    ref.assert_close(merged[embed], expected, torch.float16, embed)


SLERP = """
slices:
  - sources:
      - model: <math>
        layer_range: [0, 3]
      - model: <code>
        layer_range: [0, 3]
merge_method: slerp
base_model: <math>
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
"""


def test_gradient_slerp_example(tmp_path: Path, llama: dict[str, Path]) -> None:
    out = run_recipe(tmp_path, llama, SLERP)
    merged = ref.load_all(out)
    a, b = ref.load_all(llama["math"]), ref.load_all(llama["code"])
    for name, tensor in merged.items():
        t_layer = layer_t(name)
        if "self_attn" in name:
            t = ref.interp([0, 0.5, 0.3, 0.7, 1], t_layer)
        elif "mlp" in name:
            t = ref.interp([1, 0.5, 0.7, 0.3, 0], t_layer)
        else:
            t = 0.5
        expected = ref.slerp(t, ref.f64(a[name], torch.float16), ref.f64(b[name], torch.float16))
        ref.assert_close(tensor, expected, torch.float16, name)
    # t = 0 at layer 0 for attention: the base model exactly
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(merged[q0], a[q0].to(torch.float16))


PASSTHROUGH = """
slices:
  - sources:
    - model: <math>
      layer_range: [0, 2]
  - sources:
    - model: <code>
      layer_range: [1, 3]
merge_method: passthrough
dtype: float16
"""


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_passthrough_frankenmerge(tmp_path: Path, families: dict[str, dict[str, Path]], arch: str) -> None:
    models = families[arch]
    out = run_recipe(tmp_path, models, PASSTHROUGH)
    merged = ref.load_all(out)
    a, b = ref.load_all(models["math"]), ref.load_all(models["code"])
    origin = {0: (a, 0), 1: (a, 1), 2: (b, 1), 3: (b, 2)}
    layer_names = [n for n in merged if ".layers." in n]
    assert {int(re.search(r"layers\.(\d+)\.", n).group(1)) for n in layer_names} == {0, 1, 2, 3}
    for name, tensor in merged.items():
        match = re.search(r"layers\.(\d+)\.", name)
        if match:
            source, index = origin[int(match.group(1))]
            source_name = name.replace(f"layers.{match.group(1)}.", f"layers.{index}.")
        else:
            source, source_name = (a if "embed" in name else b), name
        assert torch.equal(tensor, source[source_name].to(torch.float16)), name
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    if arch == "qwen2":
        assert len(config["layer_types"]) == 4  # mergekit leaves this stale; transformers then refuses it
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False)


BIO = """
models:
  - model: <instruct>
    parameters:
      density: 0.5
      weight: 0.5
  - model: <math>
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: <base>
parameters:
  normalize: false
  int8_mask: true
dtype: float16
"""


def test_bio_merge_example_ties_without_normalize(tmp_path: Path, llama: dict[str, Path]) -> None:
    out = run_recipe(tmp_path, llama, BIO)
    merged = ref.load_all(out)
    base = ref.load_all(llama["base"])
    models = [ref.load_all(llama[k]) for k in ("instruct", "math")]
    for name, tensor in merged.items():
        expected, ambiguous = ref.ties(
            ref.f64(base[name], torch.float16),
            [ref.f64(m[name], torch.float16) for m in models],
            [0.5, 0.5],
            [0.5, 0.5],
            normalize=False,
        )
        ref.assert_close(tensor, expected, torch.float16, name, skip=ambiguous)


MULTI = """
name: first-merge
merge_method: linear
models:
  - model: <math>
  - model: <code>
parameters:
  weight: 0.5
---
name: second-merge
merge_method: slerp
base_model: first-merge  # Reference previous merge
models:
  - model: <instruct>
parameters:
  t: 0.5
---
# Final merge (no name)
merge_method: dare_ties
base_model: <base>
models:
  - model: second-merge
    parameters:
      density: 0.6
      weight: 0.5
  - model: <code>
    parameters:
      density: 0.8
      weight: 0.5
"""


def test_multi_document_recipe(tmp_path: Path, llama: dict[str, Path]) -> None:
    out = run_recipe(tmp_path, llama, MULTI)
    stages = tmp_path / "out-stages"
    first, second = ref.load_all(stages / "first-merge"), ref.load_all(stages / "second-merge")
    m, c, i = (ref.load_all(llama[k]) for k in ("math", "code", "instruct"))
    for name in first:
        expected_first = ref.linear([ref.f64(m[name]), ref.f64(c[name])], [0.5, 0.5])
        ref.assert_close(first[name], expected_first, torch.float32, name)
        expected_second = ref.slerp(0.5, ref.f64(first[name]), ref.f64(i[name]))
        ref.assert_close(second[name], expected_second, torch.float32, name)
    final = ref.load_all(out)
    assert set(final) == set(first)
    # same seed, same bytes; the finished stages are reused rather than recomputed
    stage_file = next((tmp_path / "out-stages" / "first-merge").glob("*.safetensors"))
    stamp = stage_file.stat().st_mtime_ns
    again = run_recipe(tmp_path, llama, MULTI, "--overwrite")
    assert stage_file.stat().st_mtime_ns == stamp
    for name, tensor in ref.load_all(again).items():
        assert torch.equal(tensor, final[name]), name
    up = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(final[up], second[up])
