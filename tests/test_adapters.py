"""Adapters as deltas: every variant equals peft's own ``merge_and_unload`` on the receiving model.

Adapters are made by peft itself on the tiny *base* models (random factors, as after training) and
transferred into the *instruct* models, the GIFT setting.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from transformers import AutoModelForCausalLM

from gift_merge.cli import main
from tests import reference as ref
from tests.adapter_variants import VARIANTS, make_adapter


def peft_merged(target: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def run(tmp_path: Path, text: str, *extra: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(recipe), str(out), "-q", *extra])
    assert result.exit_code == 0, result.output
    return out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "row-blocks"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transfer_equals_peft_merge_and_unload(
    tmp_path: Path,
    families: dict[str, dict[str, Path]],
    adapters: dict[str, Path],
    variant: str,
    streamed: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if streamed:  # force the executor's row-block path (taken for large tensors) onto the tiny ones
        import gift_merge.engine.blocks as blocks

        monkeypatch.setattr(blocks, "CHUNK_FROM", 1)
        monkeypatch.setattr(blocks, "ELEMENTWISE_CHUNK", 200)
    arch = VARIANTS[variant][0]
    instruct = families[arch]["instruct"]
    expected = peft_merged(instruct, adapters[variant])
    recipes = {
        "model+adapter": f"merge_method: passthrough\nmodels:\n  - model: {instruct}+{adapters[variant]}\n",
        "gift": f"merge_method: gift\nbase_model: {instruct}\nmodels:\n  - model: {adapters[variant]}\n",
    }
    original = ref.load_all(instruct)
    for label, text in recipes.items():
        merged = ref.load_all(run(tmp_path / label, text))
        assert set(merged) == set(original), label
        changed = 0
        for name, tensor in merged.items():
            err = relative_error(tensor, expected[name])
            assert err <= 1e-6, f"{variant} via {label}: {name} relative error {err:.2e}"
            changed += not torch.equal(tensor, original[name])
        assert changed > 0, f"{variant} via {label}: nothing changed"


def test_lambda_scales_the_delta(
    tmp_path: Path, families: dict[str, dict[str, Path]], adapters: dict[str, Path]
) -> None:
    instruct = families["llama"]["instruct"]
    text = (
        f"merge_method: gift\nbase_model: {instruct}\nmodels:\n  - model: {adapters['plain']}\n"
        "    parameters:\n      weight:\n        - {filter: mlp, value: 0.25}\n        - {value: 0.5}\n"
    )
    merged = ref.load_all(run(tmp_path, text))
    full = peft_merged(instruct, adapters["plain"])
    original = ref.load_all(instruct)
    for name, tensor in merged.items():
        lam = 0.25 if "mlp" in name else 0.5
        expected = ref.f64(original[name]) + lam * (ref.f64(full[name]) - ref.f64(original[name]))
        ref.assert_close(tensor, expected, torch.float32, name)


def lora_delta(adapter: Path, module: str, scale: float) -> np.ndarray:
    tensors = ref.load_all(adapter)
    a = tensors[f"base_model.model.{module}.lora_A.weight"].double().numpy()
    b = tensors[f"base_model.model.{module}.lora_B.weight"].double().numpy()
    return scale * (b @ a)


def test_two_adapters_through_ties_match_float64(tmp_path: Path, families: dict[str, dict[str, Path]]) -> None:
    llama = families["llama"]
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]}
    first = make_adapter(llama["base"], tmp_path / "a1", seed=11, **lora)
    second = make_adapter(llama["base"], tmp_path / "a2", seed=12, **lora)
    text = (
        f"merge_method: ties\nbase_model: {llama['instruct']}\nmodels:\n"
        f"  - model: {first}\n    parameters: {{weight: 0.7, density: 0.5}}\n"
        f"  - model: {second}\n    parameters: {{weight: 0.4, density: 0.3}}\n"
    )
    merged = ref.load_all(run(tmp_path / "run", text))
    base = ref.load_all(llama["instruct"])
    for name, tensor in merged.items():
        w = ref.f64(base[name])
        module = name.removesuffix(".weight")
        if not name.endswith(("q_proj.weight", "down_proj.weight")):
            assert torch.equal(tensor, base[name]), name  # no adapter touches it: the base, bit for bit
            continue
        deltas = [lora_delta(a, module, 2.0) for a in (first, second)]
        expected, ambiguous = ref.ties(w, [w + d for d in deltas], [0.7, 0.4], [0.5, 0.3])
        # compare the merged delta itself, relative to its own size (the base dwarfs it)
        got = tensor.double().numpy() - w
        want = expected - w
        keep = ~ambiguous
        err = np.linalg.norm((got - want)[keep]) / np.linalg.norm(want[keep])
        assert err < 1e-5, f"{name}: {err:.2e}"


def test_adapter_errors_name_the_module(
    tmp_path: Path, families: dict[str, dict[str, Path]], adapters: dict[str, Path]
) -> None:
    llama, qwen = families["llama"], families["qwen2"]
    # a Qwen2 adapter (with q-bias LoRA) does not fit a Llama model
    text = f"merge_method: gift\nbase_model: {llama['instruct']}\nmodels:\n  - model: {adapters['qwen2-bias']}\n"
    (tmp_path / "r.yaml").write_text(text)
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2
    assert "module model.layers.0.self_attn" in result.output or "module model.embed_tokens" in result.output
    # an unknown peft type
    odd = shutil.copytree(adapters["plain"], tmp_path / "odd")
    config = json.loads((odd / "adapter_config.json").read_text())
    config["peft_type"] = "LOHA"
    (odd / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "r2.yaml").write_text(
        f"merge_method: gift\nbase_model: {llama['instruct']}\nmodels:\n  - model: {odd}\n"
    )
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "r2.yaml")])
    assert result.exit_code == 2 and "LOHA" in result.output
    # a full model where gift wants adapters
    (tmp_path / "r3.yaml").write_text(
        f"merge_method: gift\nbase_model: {llama['instruct']}\nmodels:\n  - model: {qwen['math']}\n"
    )
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "r3.yaml")])
    assert result.exit_code == 2 and "takes adapter folders" in result.output


def test_unrelated_base_warns(tmp_path: Path, families: dict[str, dict[str, Path]], adapters: dict[str, Path]) -> None:
    from gift_merge.inputs import ModelResolver, _family
    from gift_merge.io.adapter import AdapterReader

    assert _family("Qwen/Qwen2.5-0.5B-Instruct") == _family("Qwen/Qwen2.5-0.5B")
    assert _family("meta-llama/Llama-3.1-8B") != _family("Qwen/Qwen2.5-7B-Instruct")
    resolver = ModelResolver(tmp_path)
    base = resolver.resolve(
        __import__("gift_merge.recipe", fromlist=["ModelRef"]).ModelRef(str(families["llama"]["instruct"]))
    )
    adapter = AdapterReader(adapters["plain"])
    resolver._warn_if_unrelated(adapter, base)
    assert not resolver.warnings  # local folder names say nothing about what a model is
    adapter.config["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B"
    base.label = "Qwen/Qwen2.5-7B-Instruct"
    resolver._warn_if_unrelated(adapter, base)
    assert resolver.warnings and "was trained on meta-llama/Llama-3.1-8B" in resolver.warnings[0]
    resolver.warnings.clear()
    base.label = "meta-llama/Llama-3.1-8B-Instruct"
    resolver._warn_if_unrelated(adapter, base)
    assert not resolver.warnings


def test_pickled_adapter_only_with_opt_in(
    tmp_path: Path, families: dict[str, dict[str, Path]], adapters: dict[str, Path]
) -> None:
    from safetensors.torch import load_file

    instruct = families["llama"]["instruct"]
    pickled = tmp_path / "pickled"
    shutil.copytree(adapters["plain"], pickled)
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    text = f"merge_method: gift\nbase_model: {instruct}\nmodels:\n  - model: {pickled}\n"
    (tmp_path / "r.yaml").write_text(text)
    refused = CliRunner().invoke(main, ["validate", str(tmp_path / "r.yaml")], env={"GIFT_MERGE_ALLOW_PICKLE": ""})
    assert refused.exit_code == 2 and "--allow-pickle" in refused.output
    # env lists the variable so the runner restores it afterwards: the flag sets it for the process
    args = ["--allow-pickle", "run", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "-q"]
    result = CliRunner().invoke(main, args, env={"GIFT_MERGE_ALLOW_PICKLE": ""})
    assert "GIFT_MERGE_ALLOW_PICKLE" not in __import__("os").environ
    assert result.exit_code == 0, result.output
    safe = ref.load_all(
        run(tmp_path / "safe", f"merge_method: gift\nbase_model: {instruct}\nmodels:\n  - model: {adapters['plain']}\n")
    )
    for name, tensor in ref.load_all(tmp_path / "out").items():
        assert torch.equal(tensor, safe[name]), name
