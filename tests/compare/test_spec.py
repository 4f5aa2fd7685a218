"""``compare:`` documents: arms, sweeps, the GIFT baselines preset, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from gift_merge.cli import main
from gift_merge.errors import GiftMergeError
from gift_merge.recipe import load_recipe
from gift_merge.recipe.loader import parse_recipe
from gift_merge.recipe.schema import MergeStage, TrainStage

DATA = Path(__file__).resolve().parents[2] / "recipes" / "data" / "numina_cot_24.jsonl"


def _parse(text: str, folder: Path | None = None):
    return parse_recipe(text, folder=folder or Path.cwd())


def test_arms_as_stage_model_and_inline_document() -> None:
    recipe = _parse(
        "name: soup\nmerge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n---\n"
        "compare:\n  tasks: [gift_sni]\n  arms:\n    soup: soup\n    a: org/a\n"
        "    t:\n      merge_method: ties\n      base_model: b\n      models: [{model: a, parameters: {weight: 1, density: 0.5}}]\n"
    )
    spec = recipe.compare
    assert spec is not None
    assert [(a.name, a.stage, str(a.model) if a.model else None) for a in spec.arms] == [
        ("soup", "soup", None), ("a", None, "org/a"), ("t", "t", None)
    ]  # fmt: skip
    assert [s.name for s in recipe.stages] == ["soup", "t"]
    assert spec.reference == "soup" and spec.seeds == (0,)
    assert spec.target_task == "gift_sni" and spec.retention_task is None


def test_sweep_expands_a_grid_with_exact_paths() -> None:
    recipe = _parse(
        "compare:\n  tasks: [gift_gsm8k, gift_sni]\n  arms:\n    ta:\n      merge_method: task_arithmetic\n"
        "      base_model: b\n      models: [{model: a}, {model: c}]\n"
        "      sweep: {weight: [0.5, 1.0], 'models[1].parameters.weight': [2, 3]}\n"
    )
    assert recipe.compare is not None
    names = [a.name for a in recipe.compare.arms]
    assert names == ["ta-weight=0.5,weight=2", "ta-weight=0.5,weight=3", "ta-weight=1,weight=2", "ta-weight=1,weight=3"]
    stages = {s.name: s for s in recipe.stages}
    stage = stages["ta-weight=1,weight=3"]
    assert isinstance(stage, MergeStage) and stage.models is not None
    assert stage.parameters["weight"].evaluate("x", 0.0) == 1.0
    assert stage.models[1].parameters["weight"].evaluate("x", 0.0) == 3.0
    assert recipe.compare.retention_task == "gift_sni"


@pytest.mark.parametrize(
    ("compare", "message"),
    [
        ("  tasks: [gift_sni]\n  arms: {a: x}\n  seeds: [1, 1]\n", "seeds repeat"),
        ("  tasks: [gift_sni]\n  arms: {a: x}\n  refrence: a\n", "unknown key 'refrence' (did you mean 'reference'?)"),
        ("  tasks: [gift_sni]\n  arms: {a: x}\n  reference: b\n", "compare.reference: no arm named 'b'"),
        ("  tasks: []\n  arms: {a: x}\n", "compare.tasks: name at least one"),
        ("  tasks: [gift_sni]\n", "no arms"),
        ("  tasks: [gift_sni]\n  arms: {a: x}\n  eval: {samples: 0}\n", "compare.eval: samples: must be at least 1"),
        ("  tasks: [gift_sni]\n  arms: {a: x}\n  eval: {limt: 3}\n", "unknown key 'limt' (did you mean 'limit'?)"),
        ("  tasks: [gift_sni]\n  arms: {a: x}\n  target_task: gift_gsm8k\n", "'gift_gsm8k' is not one of the tasks"),
        (
            "  tasks: [gift_sni]\n  arms:\n    t:\n      merge_method: task_arithmetic\n      base_model: b\n"
            "      models: [{model: a, parameters: {weight: 1}}]\n      sweep: {weight: [1, 2]}\n",
            "models[0] sets its own 'weight'",
        ),
        (
            "  tasks: [gift_sni]\n  arms:\n    t:\n      merge_method: linear\n      models: [{model: a}]\n"
            "      sweep: {weight: [1, 'x']}\n",
            "sweep.weight: expected a non-empty list of numbers",
        ),
        (
            "  tasks: [gift_sni]\n  arms:\n    t:\n      merge_method: tise\n      models: [{model: a}]\n",
            "did you mean 'ties'",
        ),
    ],
)
def test_bad_compare_documents_fail_naming_the_key(compare: str, message: str) -> None:
    with pytest.raises(GiftMergeError, match=None) as caught:
        _parse(f"compare:\n{compare}")
    assert message in str(caught.value)


def test_other_documents_need_names_and_one_compare_at_most() -> None:
    with pytest.raises(GiftMergeError, match="every other document needs a 'name'"):
        _parse("merge_method: linear\nmodels: [{model: a}]\n---\ncompare:\n  tasks: [gift_sni]\n  arms: {a: x}\n")
    with pytest.raises(GiftMergeError, match="at most one 'compare:'"):
        _parse("compare:\n  tasks: [t]\n  arms: {a: x}\n---\ncompare:\n  tasks: [t]\n  arms: {a: x}\n")
    with pytest.raises(GiftMergeError, match="also a document of the recipe"):
        _parse(
            "name: a\nmerge_method: linear\nmodels: [{model: m}]\n---\n"
            "compare:\n  tasks: [t]\n  arms:\n    a:\n      merge_method: linear\n      models: [{model: m}]\n"
        )


def _baselines_recipe(llama: dict[str, Path], folder: Path, seeds: str = "[0]") -> Path:
    recipe = folder / "baselines.yaml"
    recipe.write_text(
        "compare:\n"
        "  baselines:\n"
        f"    base: {llama['base']}\n    instruct: {llama['instruct']}\n    data: {DATA}\n"
        "    train: {max_length: 128, r: 4, alpha: 8, batch_size: 4, grad_accum: 2, epochs: 1, lr: 1.0e-3}\n"
        "    weights: [0.5, 1.0]\n"
        "  tasks: [gift_mmlu_stem, gift_sni]\n"
        f"  seeds: {seeds}\n"
        "  eval: {limit: 2, max_new_tokens: 4, batch_size: 4}\n"
        "output: out\n"
    )
    return recipe


def test_gift_baselines_preset_expands_to_the_papers_arms(llama: dict[str, Path], tmp_path: Path) -> None:
    recipe = load_recipe(_baselines_recipe(llama, tmp_path))
    assert recipe.compare is not None
    assert [a.name for a in recipe.compare.arms] == [
        "instruct", "instruct-sft", "shadow-ft", "gift", "task-arithmetic-weight=0.5", "task-arithmetic-weight=1",
        "ties", "dare-ties",
    ]  # fmt: skip
    stages = {s.name: s for s in recipe.stages}
    trains = {n: s for n, s in stages.items() if isinstance(s, TrainStage)}
    assert set(trains) == {"adapter-sft-instruct", "adapter-sft-base", "adapter-gift-base"}
    assert trains["adapter-sft-instruct"].base.path == str(llama["instruct"])
    assert trains["adapter-gift-base"].config.mode == "gift" and trains["adapter-gift-base"].instruct is not None
    assert {s.config.r for s in trains.values()} == {4} and {s.config.lr for s in trains.values()} == {1e-3}
    shadow = stages["shadow-ft"]
    assert isinstance(shadow, MergeStage) and shadow.merge_method == "gift"
    assert shadow.models is not None and shadow.models[0].model.stage == "adapter-sft-base"
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "baselines.yaml")])
    assert result.exit_code == 0, result.output
    assert "3 to train" in result.output


@pytest.mark.slow
def test_gift_baselines_run_end_to_end(llama: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    result = CliRunner().invoke(main, ["-q", "compare", str(_baselines_recipe(llama, tmp_path))])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "out" / "results.md").read_text()
    for arm in ("instruct-sft", "shadow-ft", "gift", "task-arithmetic-weight=0.5", "ties", "dare-ties"):
        assert f"| {arm}" in table
    for adapter in ("adapter-sft-instruct", "adapter-sft-base", "adapter-gift-base"):
        assert (tmp_path / "out" / "stages" / "seed-0" / adapter / "adapter_model.safetensors").is_file()


def test_gates_parse_and_name_their_errors() -> None:
    recipe = _parse(
        "compare:\n  tasks: [gift_sni]\n  arms: {a: x, b: y}\n"
        "  gates:\n    - {arm: b, task: gift_sni, metric: rougeL, min: 0.9, why: the transfer keeps the format}\n"
    )
    assert recipe.compare is not None
    (gate,) = recipe.compare.gates
    assert (gate.arm, gate.task, gate.metric, gate.minimum, gate.maximum) == ("b", "gift_sni", "rougeL", 0.9, None)
    for bad, message in (
        ("{arm: c, task: gift_sni, metric: acc, min: 1}", "gates[0].arm: no arm named 'c'"),
        ("{arm: a, task: gift_sni, metric: acc}", "give a number as 'min', 'max' or both"),
        ("{arm: a, task: t2, metric: acc, min: 1}", "gates[0].task: 't2' is not one of the tasks"),
        ("{arm: a, task: gift_sni, metric: acc, mn: 1}", "unknown key 'mn'"),
    ):
        with pytest.raises(GiftMergeError) as caught:
            _parse(f"compare:\n  tasks: [gift_sni]\n  arms: {{a: x}}\n  gates:\n    - {bad}\n")
        assert message in str(caught.value)
