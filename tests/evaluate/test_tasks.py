"""The shipped lm-eval tasks load offline from any directory, prompt as specified and score their own gold answers."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks must never reach the network

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from gift_merge.evaluate.tasks import SHIPPED_TASKS, TASKS_DIR, hooks

SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
DATA_FILES = {
    "gift_gsm8k": "gsm8k_test.jsonl",
    "gift_svamp": "svamp_test.jsonl",
    "gift_mmlu_stem": "mmlu_stem_test.jsonl",
    "gift_sni": "sni_gen.jsonl",
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """All shipped tasks, built by lm-eval from a working directory unrelated to the package."""
    cwd = Path.cwd()
    os.chdir(tmp_path_factory.mktemp("elsewhere"))
    try:
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        assert set(manager.all_tasks) == set(SHIPPED_TASKS)
        return manager.load(list(SHIPPED_TASKS))["tasks"]
    finally:
        os.chdir(cwd)


def _first_row(task: str) -> dict[str, Any]:
    with (TASKS_DIR / "data" / DATA_FILES[task]).open(encoding="utf-8") as handle:
        return json.loads(handle.readline())


def test_every_yaml_task_is_listed() -> None:
    names = {re.search(r"^task: (\S+)$", p.read_text(), re.M).group(1) for p in TASKS_DIR.glob("[!_]*.yaml")}
    assert names == set(SHIPPED_TASKS)
    for name, description in SHIPPED_TASKS.items():
        assert description and "\n" not in description, name


@pytest.mark.parametrize("name", sorted(SHIPPED_TASKS))
def test_task_has_200_test_docs(tasks: dict[str, Any], name: str) -> None:
    task = tasks[name]
    assert task.has_test_docs() and not task.has_training_docs() and not task.has_validation_docs()
    assert len(task.test_docs()) == 200
    assert task.config.num_fewshot == 0


def test_generation_settings(tasks: dict[str, Any]) -> None:
    for name, max_tokens in {"gift_gsm8k": 512, "gift_svamp": 512, "gift_sni": 256}.items():
        assert tasks[name].config.generation_kwargs == {"until": [], "do_sample": False, "max_gen_toks": max_tokens}
        assert [f.name for f in tasks[name]._filters] == ["all"]
    assert tasks["gift_mmlu_stem"].config.output_type == "multiple_choice"


def test_first_rows_prompt_and_target(tasks: dict[str, Any]) -> None:
    gsm8k, svamp, mmlu, sni = (tasks[n] for n in ("gift_gsm8k", "gift_svamp", "gift_mmlu_stem", "gift_sni"))
    row = _first_row("gift_gsm8k")
    doc = gsm8k.test_docs()[0]
    assert gsm8k.doc_to_text(doc) == row["question"] + SUFFIX
    assert gsm8k.doc_to_text(doc).startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert gsm8k.doc_to_target(doc) == "18"

    doc = svamp.test_docs()[0]
    assert svamp.doc_to_text(doc) == (
        "There are 87 oranges and 290 bananas in Philip's collection. If the bananas are organized into 2 groups "
        "and oranges are organized into 93 groups How big is each group of bananas?" + SUFFIX
    )
    assert svamp.doc_to_target(doc) == "145"

    row = _first_row("gift_mmlu_stem")
    doc = mmlu.test_docs()[0]
    assert mmlu.doc_to_text(doc) == (
        f"{row['question']}\nA. {row['choices'][0]}\nB. {row['choices'][1]}\nC. {row['choices'][2]}\n"
        f"D. {row['choices'][3]}\nAnswer:"
    )
    assert mmlu.doc_to_choice(doc) == ["A", "B", "C", "D"]
    assert mmlu.doc_to_target(doc) == 2 == row["answer"]

    row = _first_row("gift_sni")
    doc = sni.test_docs()[0]
    assert sni.doc_to_text(doc) == row["instruction"]
    assert sni.doc_to_text(doc).startswith("Task definition:\nIn this task, you are given a piece of an article.")
    assert sni.doc_to_target(doc) == row["response"]


def _shifted(number: str) -> str:
    return str(float(number.replace(",", "")) + 1)


def test_gsm8k_scores_its_reference_solutions(tasks: dict[str, Any]) -> None:
    task = tasks["gift_gsm8k"]
    for doc in task.test_docs():
        gold = doc["answer"].rsplit("####", 1)[1].strip()
        assert task.process_results(doc, [[doc["answer"]]]) == {"acc": 1.0, "pass_at_k": 1.0, "maj_at_k": 1.0}
        assert task.process_results(doc, [[f"#### {_shifted(gold)}"]])["acc"] == 0.0


def test_svamp_scores_boxed_answers(tasks: dict[str, Any]) -> None:
    task = tasks["gift_svamp"]
    for doc in task.test_docs():
        assert task.process_results(doc, [[f"\\boxed{{{doc['Answer']}}}"]]) == {
            "acc": 1.0,
            "pass_at_k": 1.0,
            "maj_at_k": 1.0,
        }
        assert task.process_results(doc, [[f"\\boxed{{{doc['Answer'] + 1}}}"]])["acc"] == 0.0


def test_math_scores_all_k_samples(tasks: dict[str, Any]) -> None:
    task = tasks["gift_svamp"]
    doc = task.test_docs()[0]  # answer 145
    samples = [r"\boxed{144}", r"\boxed{145}", r"\boxed{144}", "no idea"]
    assert task.process_results(doc, [samples]) == {"acc": 0.25, "pass_at_k": 1.0, "maj_at_k": 0.0}
    assert task.process_results(doc, [r"\boxed{145}"])["acc"] == 1.0  # one string: a run without the `all` filter


def test_sni_scores_its_reference(tasks: dict[str, Any]) -> None:
    task = tasks["gift_sni"]
    doc = task.test_docs()[0]
    assert task.process_results(doc, [[doc["response"]]]) == {"rougeL": 1.0, "exact_match": 1.0}
    scores = task.process_results(doc, [[doc["response"], "Something else entirely."]])
    assert scores["exact_match"] == 0.5 and scores["rougeL"] == pytest.approx(0.5)


def test_mmlu_scores_the_gold_letter(tasks: dict[str, Any]) -> None:
    task = tasks["gift_mmlu_stem"]
    for doc in task.test_docs():
        gold = task.doc_to_target(doc)
        assert task.doc_to_choice(doc)[gold] == "ABCD"[doc["answer"]]
        results = [(0.0 if i == gold else -1.0 - i, False) for i in range(4)]
        assert task.process_results(doc, results) == {"acc": 1.0, "acc_norm": 1.0}
        results = [(-1.0 if i == gold else -0.5, False) for i in range(4)]
        assert task.process_results(doc, results) == {"acc": 0.0, "acc_norm": 0.0}


def test_all_filter_keeps_every_repeat(tasks: dict[str, Any]) -> None:
    """With ``repeats: K`` lm-eval stores K responses per request; the filter must pass all of them on."""
    task = tasks["gift_gsm8k"]
    doc = task.test_docs()[0]
    instance = Instance(request_type="generate_until", doc=doc, arguments=("prompt", {}), idx=0)
    instance.resps = [r"\boxed{18}", r"\boxed{17}", "none"]
    task._filters[0].apply([instance])
    assert instance.filtered_resps["all"] == [r"\boxed{18}", r"\boxed{17}", "none"]


def test_hooks_accept_metadata_and_letter_answers() -> None:
    assert len(hooks.load_gsm8k(pretrained="some/model", version=1.0)["test"]) == 200
    assert hooks.mmlu_gold({"answer": "C"}) == 2
    assert hooks.mmlu_gold({"answer": 3}) == 3
    assert hooks.svamp_gold({"Answer": 2.5}) == "2.5"
    with pytest.raises(ValueError):
        hooks.gsm8k_gold({"answer": "no marker"})
