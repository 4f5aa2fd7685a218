"""``gift-merge eval`` against lm-eval's own API, and what it accepts as a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("lm_eval")
pytest.importorskip("math_verify")
pytest.importorskip("rouge_score")

from gift_merge.cli import main

STOP = "<|im_end|>"  # the tiny models' chat turns end here, their EOS is </s>


def _eval(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["eval", *args])
    return result.exit_code, result.output


def _lm_eval_api(model: Path, tasks: list[str], *, limit: int, seed: int, gen_kwargs: dict, repeats: int = 1) -> dict:
    """The same evaluation through lm-eval's documented API: its HF backend loads the folder itself."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from gift_merge.evaluate.tasks import TASKS_DIR

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    specs: list = tasks
    if repeats > 1:
        loaded = manager.load(tasks)["tasks"]
        for task in loaded.values():
            task.set_config(key="repeats", value=repeats)
        specs = list(loaded.values())
    return lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model), "dtype": "float32"},
        tasks=specs,
        task_manager=manager,
        batch_size=8,
        device="cpu",
        limit=limit,
        apply_chat_template=True,
        gen_kwargs=gen_kwargs,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )


def test_scores_equal_lm_eval_api(llama: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "scores.json"
    code, output = _eval(str(llama["instruct"]), "--tasks", "gift_mmlu_stem,gift_sni", "--limit", "5",
                         "--max-new-tokens", "12", "--seed", "3", "--out", str(out))  # fmt: skip
    assert code == 0, output
    ours = json.loads(out.read_text())
    theirs = _lm_eval_api(
        llama["instruct"],
        ["gift_mmlu_stem", "gift_sni"],
        limit=5,
        seed=3,
        gen_kwargs={"until": [STOP], "max_gen_toks": 12},
    )
    assert ours["lm_eval"]["results"] == theirs["results"]
    assert ours["scores"]["gift_mmlu_stem"]["acc"] == theirs["results"]["gift_mmlu_stem"]["acc,none"]
    assert ours["scores"]["gift_sni"]["rougeL"] == theirs["results"]["gift_sni"]["rougeL,all"]
    assert ours["documents"] == {"gift_mmlu_stem": 5, "gift_sni": 5}
    assert "gift_mmlu_stem" in output and "rougeL" in output


def test_sampled_answers_equal_lm_eval_api_for_the_same_seed(llama: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sampled.json"
    args = [str(llama["instruct"]), "--tasks", "gift_gsm8k", "--limit", "2", "--max-new-tokens", "6", "--samples", "3",
            "--temperature", "0.8", "--seed", "11", "--log-samples", "--out", str(out)]  # fmt: skip
    code, output = _eval(*args)
    assert code == 0, output
    ours = json.loads(out.read_text())
    gen = {"until": [STOP], "do_sample": True, "temperature": 0.8, "top_p": 1.0, "max_gen_toks": 6}
    theirs = _lm_eval_api(llama["instruct"], ["gift_gsm8k"], limit=2, seed=11, gen_kwargs=gen, repeats=3)
    our_answers = [s["resps"] for s in ours["samples"]["gift_gsm8k"]]
    their_answers = [s["resps"] for s in theirs["samples"]["gift_gsm8k"]]
    assert our_answers == their_answers
    assert all(len(r[0]) == 3 for r in our_answers)
    assert len({a for r in our_answers for a in r[0]}) > 2  # sampling, not three copies of one greedy answer
    assert set(ours["scores"]["gift_gsm8k"]) == {"acc", "pass_at_k", "maj_at_k"}


def test_model_plus_adapter_is_peft_merged(llama: dict[str, Path], tmp_path: Path) -> None:
    """``MODEL+ADAPTER`` scores what gift-merge's exact transfer writes, to float rounding."""
    from gift_merge.toy.tiny_models import build_adapter

    adapter = build_adapter(llama["base"], tmp_path / "adapter", seed=5, scale=0.2)
    recipe = tmp_path / "transfer.yaml"
    recipe.write_text(
        f"merge_method: gift\nbase_model: {llama['base']}\nmodels:\n  - model: {adapter}\ndtype: float32\n"
    )
    assert CliRunner().invoke(main, ["-q", "run", str(recipe), str(tmp_path / "merged")]).exit_code == 0
    scores = {}
    for name, model in (("pair", f"{llama['base']}+{adapter}"), ("merged", str(tmp_path / "merged"))):
        out = tmp_path / f"{name}.json"
        code, output = _eval(model, "--tasks", "gift_mmlu_stem", "--limit", "6", "--log-samples", "--out", str(out))
        assert code == 0, output
        scores[name] = json.loads(out.read_text())
    pair = [float(r[0][0]) for s in scores["pair"]["samples"]["gift_mmlu_stem"] for r in s["resps"]]
    merged = [float(r[0][0]) for s in scores["merged"]["samples"]["gift_mmlu_stem"] for r in s["resps"]]
    base_out = tmp_path / "base.json"
    assert (
        _eval(str(llama["base"]), "--tasks", "gift_mmlu_stem", "--limit", "6", "--log-samples", "--out", str(base_out))[
            0
        ]
        == 0
    )
    base = [float(r[0][0]) for s in json.loads(base_out.read_text())["samples"]["gift_mmlu_stem"] for r in s["resps"]]
    assert pair == pytest.approx(merged, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(pair, base, strict=True)) > 1e-3  # the adapter changed the model


def test_recipe_stage_reference(llama: dict[str, Path], tmp_path: Path) -> None:
    from gift_merge.evaluate.loading import resolve_target

    recipe = tmp_path / "two.yaml"
    recipe.write_text(
        f"name: first\nmerge_method: linear\nmodels:\n  - model: {llama['instruct']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {llama['math']}\n    parameters: {{weight: 1}}\n---\n"
        f"merge_method: linear\nmodels:\n  - model: first\n    parameters: {{weight: 1}}\noutput: final\n"
    )
    code, output = _eval(f"{recipe}:first", "--tasks", "gift_sni")
    assert code == 2 and "not built yet" in output and "gift-merge run" in output
    assert CliRunner().invoke(main, ["-q", "run", str(recipe)]).exit_code == 0
    assert resolve_target(f"{recipe}:first").model == tmp_path / "final-stages" / "first"
    assert resolve_target(str(recipe)).model == tmp_path / "final"
    code, output = _eval(f"{recipe}:nope", "--tasks", "gift_sni")
    assert code == 2 and "no stage named 'nope'" in output and "first" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "gift_gsm8"], "unknown task 'gift_gsm8' (did you mean 'gift_gsm8k'?)"),
        (["--tasks", "gift_gsm8k", "--samples", "4", "--temperature", "0"], "needs a temperature above 0"),
        (["--tasks", ""], "name at least one task"),
        (["--tasks", "gift_sni", "--samples", "0"], "--samples: must be at least 1"),
    ],
)
def test_bad_options_fail_in_one_line(llama: dict[str, Path], args: list[str], message: str) -> None:
    code, output = _eval(str(llama["instruct"]), *args)
    assert code == 2
    assert message in output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1


def test_missing_model_and_existing_out(llama: dict[str, Path], tmp_path: Path) -> None:
    code, output = _eval("--tasks", "gift_sni")
    assert code == 2 and "MODEL: missing" in output
    code, output = _eval(str(tmp_path / "nowhere"), "--tasks", "gift_sni")
    assert code == 2 and "no such folder" in output
    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    code, output = _eval(str(llama["instruct"]), "--tasks", "gift_sni", "--out", str(taken))
    assert code == 2 and "already exists" in output and taken.read_text() == "{}"


def test_list_tasks_names_the_shipped_tasks() -> None:
    code, output = _eval("--list-tasks")
    assert code == 0
    names = [line.split()[0] for line in output.strip().splitlines()]
    assert names == ["gift_gsm8k", "gift_svamp", "gift_mmlu_stem", "gift_sni", "toy_task", "toy_instruct"]
