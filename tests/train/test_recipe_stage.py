"""A recipe's ``train:`` document: trained like ``gift-merge train``, planned with the merges after it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from gift_merge.cli import main
from gift_merge.merge import MergeOptions, plan_recipe, run_recipe
from gift_merge.recipe import load_recipe
from gift_merge.train import TrainConfig, train
from gift_merge.train_stage import TrainPlan

from .conftest import MAX_LENGTH, train_options

TRAIN_OPTIONS = f"""  r: 4
  alpha: 8
  max_length: {MAX_LENGTH}
  batch_size: 4
  grad_accum: 2
  lr: 1.0e-3
  device: cpu
  save_steps: 0
  seed: 5
"""


def pipeline(tiny: dict[str, Path], data: Path, *, extra: str = "", instruct: bool = False) -> str:
    scorer = f"  instruct: {tiny['instruct']}\n" if instruct else ""
    return (
        f"name: adapter\ntrain:\n  base: {tiny['base']}\n{scorer}  data: {data}\n{TRAIN_OPTIONS}{extra}"
        f"---\nmerge_method: gift\nbase_model: {tiny['instruct']}\nmodels:\n  - model: adapter\n"
        "dtype: float32\n"
    )


def write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(text)
    return path


def test_pipeline_trains_the_adapter_train_would_and_transfers_it(
    tiny: dict[str, Path], annotated: Path, tmp_path: Path
) -> None:
    recipe = write(tmp_path, pipeline(tiny, annotated))
    result = CliRunner().invoke(main, ["--quiet", "run", str(recipe), str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    stage_adapter = tmp_path / "merged-stages" / "adapter"

    # the same options through `train` give the same adapter, bit for bit
    direct = tmp_path / "direct"
    train(TrainConfig.from_mapping(train_options(tiny, annotated, direct, instruct=None)), quiet=True)
    ours, theirs = (load_file(p / "adapter_model.safetensors") for p in (stage_adapter, direct))
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key

    # the merged model is the instruct model plus ΔW, as peft merges it
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    instruct = AutoModelForCausalLM.from_pretrained(tiny["instruct"], dtype=torch.float64)
    expected = PeftModel.from_pretrained(instruct, stage_adapter).merge_and_unload().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float64).state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=0, atol=1e-6, msg=name)
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "## How `adapter` was trained" in card and "GIFT" in card


def test_plan_promises_the_weights_training_patches(tiny: dict[str, Path], annotated: Path, tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, pipeline(tiny, annotated, extra="  targets: [q_proj, down_proj]\n")))
    plans = plan_recipe(recipe, tmp_path / "out")
    train_plan, merge_plan = plans
    assert isinstance(train_plan, TrainPlan)
    planned = set(train_plan.patches)
    assert planned and all(n.endswith(("q_proj.weight", "down_proj.weight")) for n in planned)
    touched = {j.name for j in merge_plan.jobs if any(s.model == "adapter" for s in j.sources)}
    assert touched == planned

    run_recipe(recipe, tmp_path / "out", MergeOptions(quiet=True))
    trained = load_file(tmp_path / "out-stages" / "adapter" / "adapter_model.safetensors")
    modules = {k.removeprefix("base_model.model.").split(".lora_")[0] + ".weight" for k in trained}
    assert modules == planned


def test_rerun_reuses_the_adapter_until_the_data_changes(
    tiny: dict[str, Path], annotated: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data.jsonl"
    shutil.copy(annotated, data)
    recipe = load_recipe(write(tmp_path, pipeline(tiny, data)))
    options = MergeOptions(quiet=True, overwrite=True)
    run_recipe(recipe, tmp_path / "out", options)
    log = tmp_path / "out-stages" / "adapter" / "training_log.jsonl"
    first = log.stat().st_mtime_ns
    run_recipe(recipe, tmp_path / "out", options)
    assert log.stat().st_mtime_ns == first  # reused

    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows[:12]) + "\n")  # same stage text, different data
    run_recipe(recipe, tmp_path / "out", options)
    retrained = json.loads((tmp_path / "out-stages" / "adapter" / "gift.json").read_text())
    assert retrained["examples"] == 12


def test_a_stage_trains_on_an_earlier_merge_and_rebuilds_after_it(
    tiny: dict[str, Path], annotated: Path, tmp_path: Path
) -> None:
    def text(weight: float) -> str:
        return (
            f"name: mixed\nmerge_method: linear\nmodels:\n  - model: {tiny['base']}\n"
            f"    parameters: {{weight: {weight}}}\n  - model: {tiny['instruct']}\n"
            f"    parameters: {{weight: {1 - weight}}}\ndtype: float32\n---\n"
            + pipeline(tiny, annotated).replace(f"base: {tiny['base']}", "base: mixed")
        )

    recipe = load_recipe(write(tmp_path, text(0.5)))
    assert [s.name for s in recipe.stages] == ["mixed", "adapter", None]
    options = MergeOptions(quiet=True, overwrite=True)
    run_recipe(recipe, tmp_path / "out", options)
    provenance = json.loads((tmp_path / "out-stages" / "adapter" / "gift.json").read_text())
    assert provenance["base_model"] == str(tmp_path / "out-stages" / "mixed")
    log = tmp_path / "out-stages" / "adapter" / "training_log.jsonl"
    first = log.stat().st_mtime_ns

    run_recipe(load_recipe(write(tmp_path, text(0.25))), tmp_path / "out", options)
    assert log.stat().st_mtime_ns != first  # its base was rebuilt, so it was retrained


@pytest.mark.parametrize(
    ("train_section", "message"),
    [
        ("  out: somewhere\n", "train.out: a recipe's train stage writes its adapter to OUT-stages/<name>"),
        ("  learning_rate: 0.1\n", "train.learning_rate: unknown option"),
        ("  r: -1\n", "train.r: must be > 0"),
        ("  targets: [q_proj, nope]\n", "train.targets: no linear module named 'nope'"),
    ],
)
def test_bad_train_options_fail_at_validate_naming_the_key(
    tiny: dict[str, Path], annotated: Path, tmp_path: Path, train_section: str, message: str
) -> None:
    text = pipeline(tiny, annotated)
    if train_section.startswith("  r:"):
        text = text.replace("  r: 4\n", train_section)
    else:
        text = text.replace("train:\n", "train:\n" + train_section, 1)
    recipe = write(tmp_path, text)
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 2
    assert "[document 1].train." in result.output and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_unscored_data_without_an_instruct_model_fails_at_validate(tiny: dict[str, Path], tmp_path: Path) -> None:
    from .conftest import NUMINA

    result = CliRunner().invoke(main, ["validate", str(write(tmp_path, pipeline(tiny, NUMINA)))])
    assert result.exit_code == 2
    assert 'mode gift needs "scores"' in result.output and "'instruct'" in result.output


def test_missing_data_and_mixed_documents_fail(tiny: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["validate", str(write(tmp_path, pipeline(tiny, tmp_path / "none.jsonl")))])
    assert result.exit_code == 2 and "train.data:" in result.output and "none.jsonl not found" in result.output
    both = write(tmp_path / "both", f"merge_method: linear\ntrain:\n  base: {tiny['base']}\n")
    result = runner.invoke(main, ["validate", str(both)])
    assert result.exit_code == 2 and "either merges (merge_method) or trains (train)" in result.output


def test_pipeline_with_annotation_validates_and_plans(tiny: dict[str, Path], tmp_path: Path) -> None:
    from .conftest import NUMINA

    recipe = write(tmp_path, pipeline(tiny, NUMINA, instruct=True))
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 0 and "1 to train" in result.output, result.output
    result = CliRunner().invoke(main, ["plan", str(recipe)])
    assert result.exit_code == 0
    assert f"# stage adapter: train gift LoRA (r 4, alpha 8) on {tiny['base']}" in result.output
    assert "training adapter not estimated" in result.output  # only merges are probed


def test_a_recipe_that_only_trains_writes_the_adapter_to_out(
    tiny: dict[str, Path], annotated: Path, tmp_path: Path
) -> None:
    text = f"train:\n  base: {tiny['base']}\n  data: {annotated}\n{TRAIN_OPTIONS}  epochs: 1\n"
    recipe = write(tmp_path, text)
    result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "adapter")])
    assert result.exit_code == 0, result.output
    assert f"adapter written to {tmp_path / 'adapter'}" in result.output
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    again = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "adapter")])
    assert again.exit_code == 2 and "--overwrite" in again.output  # an existing output is never replaced silently
