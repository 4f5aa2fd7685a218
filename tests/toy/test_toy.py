"""The toy family: deterministic builds, a word-level tokenizer with the chat template, held-out rows that
no training generator emits, and the toy tasks' content/format scoring."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from gift_merge.evaluate.tasks import SHIPPED_TASKS, TASKS_DIR
from gift_merge.toy import corpus, problems, scoring
from gift_merge.toy.family import build_toy_family
from gift_merge.toy.gates import family_gates
from gift_merge.toy.vocabulary import CHAT_TEMPLATE, END, MAX_NUMBER, build_tokenizer

TINY = 0.02
"""``steps_scale`` of the test builds: a few optimizer steps, enough to exercise every stage."""


def _load_hooks():
    """``toy_hooks`` as lm-eval loads it: by its path, not as a package module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("toy_hooks", TASKS_DIR / "toy_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_is_deterministic_and_cached(tmp_path: Path) -> None:
    first = build_toy_family(tmp_path / "a", seed=3, threads=1, steps_scale=TINY)
    build_toy_family(tmp_path / "b", seed=3, threads=1, steps_scale=TINY)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        if name != "family.json":
            assert a[name] == b[name], name
    record_a, record_b = (json.loads((tmp_path / r / "family.json").read_text()) for r in "ab")
    record_a.pop("seconds"), record_b.pop("seconds")
    assert record_a == record_b
    assert set(record_a["gates"]) == {"max_drift", "instruct_task_content", "instruct_instruction_acc"}
    rows = family_gates(first["family"])
    assert [g.name for g in rows[:3]] == list(record_a["gates"]) and all(g.line() for g in rows)

    started = time.perf_counter()
    again = build_toy_family(tmp_path / "a", seed=3, threads=1, steps_scale=TINY)
    assert again == first and time.perf_counter() - started < 1.0
    assert _files(tmp_path / "a") == a  # a cache hit writes nothing

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(first["instruct"])
    assert tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.eos_token == END
    model = AutoModelForCausalLM.from_pretrained(first["base"])
    assert model.config.vocab_size == len(tokenizer)
    rows = [json.loads(line) for line in first["task_train"].read_text().splitlines()]
    assert rows and all(set(row) >= {"instruction", "response"} for row in rows)


def test_tokenizer_numbers_are_single_tokens_and_round_trip() -> None:
    tokenizer = build_tokenizer()
    for number in range(MAX_NUMBER + 1):
        assert len(tokenizer(str(number), add_special_tokens=False)["input_ids"]) == 1
    rng = random.Random(0)
    texts = [corpus.document(rng) for _ in range(300)]
    texts += [r["instruction"] + " " + r["response"] for r in problems.task_rows(50, 0)]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids) == " ".join(text.split())


def test_chat_template_matches_the_pretraining_chats() -> None:
    tokenizer = build_tokenizer()
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 plus 4 ?"}, {"role": "assistant", "content": "7 ."}], tokenize=False
    )
    assert rendered == corpus.chat("What is 3 plus 4 ?", "7 .")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 plus 4 ?"}], add_generation_prompt=True, tokenize=False
    )
    assert corpus.chat("What is 3 plus 4 ?", "7 .").startswith(prompt)

    from gift_merge.train.model import chat_end_token

    assert chat_end_token(tokenizer, "toy") == END == tokenizer.eos_token


def test_held_out_rows_do_not_overlap_training_rows() -> None:
    hooks = _load_hooks()
    task_eval = hooks.load_task()["test"]
    instruct_eval = hooks.load_instruct()["test"]
    assert len(task_eval) == len(instruct_eval) == 200
    held_out = set(task_eval["instruction"]) | set(instruct_eval["instruction"])
    assert all(problems.is_held_out(q) for q in held_out)
    train = {r["instruction"] for r in problems.task_rows(300, 0) + problems.instruction_rows(500, 0)}
    assert not train & held_out
    rng = random.Random(1)
    pretraining = "".join(corpus.document(rng) for _ in range(2000))
    assert not any(q in pretraining for q in held_out)


def test_gold_solutions_score_one_and_content_is_scored_apart_from_format() -> None:
    hooks = _load_hooks()
    for doc in hooks.load_task()["test"].select(range(50)):
        assert hooks.score_toy_task(doc, [doc["response"]]) == {"content": 1.0, "format": 1.0, "acc": 1.0}
        steps = [line for line in doc["response"].split(" . ") if "=" in line]
        instruct_style = f"Sure ! {' and '.join(s.split(', ')[-1] for s in steps)} . The answer is {doc['answer']} ."
        assert hooks.score_toy_task(doc, [instruct_style]) == {"content": 1.0, "format": 0.0, "acc": 0.0}
        wrong = doc["response"].replace(f"\\boxed{{ {doc['answer']} }}", "\\boxed{ 100 }")
        assert hooks.score_toy_task(doc, [wrong]) == {"content": 0.0, "format": 1.0, "acc": 0.0}
    for doc in hooks.load_instruct()["test"].select(range(50)):
        assert hooks.score_toy_instruct(doc, [doc["response"]]) == {"content": 1.0, "format": 1.0, "acc": 1.0}
        assert hooks.score_toy_instruct(doc, [f"{doc['answer']} ."]) == {"content": 1.0, "format": 0.0, "acc": 0.0}
    doc = hooks.load_task()["test"][0]
    assert hooks.score_toy_task(doc, [[doc["response"], "nothing"]])["content"] == 0.5  # K samples are averaged


def test_task_format_is_the_whole_response() -> None:
    assert scoring.score_task("First , 3 + 4 = 7 . So the answer is \\boxed{ 7 } .", "7")["format"] == 1.0
    assert scoring.score_task("Sure ! First , 3 + 4 = 7 . So the answer is \\boxed{ 7 } .", "7")["format"] == 0.0
    assert scoring.score_task("3 + 4 = 7", "7") == {"content": 1.0, "format": 0.0, "acc": 0.0}


@pytest.mark.parametrize("name", ["toy_task", "toy_instruct"])
def test_toy_tasks_are_shipped(name: str) -> None:
    assert name in SHIPPED_TASKS and (TASKS_DIR / f"{name}.yaml").is_file()


def test_pretraining_windows_start_at_a_document_and_follow_the_stream() -> None:
    """Each window is the stream's next documents from a document's first token, cut at the window's
    end; what a window cuts off is dropped, never continued in the next window."""
    tokenizer = build_tokenizer()
    windows = corpus.token_batches(tokenizer, seed=3, steps=2, batch_size=4, length=48).view(-1, 48).tolist()
    rng = random.Random("pretrain-3")
    stream = [tokenizer(corpus.document(rng), add_special_tokens=False)["input_ids"] for _ in range(512)]
    expected, current = [], []
    for ids in stream:
        current += ids[: 48 - len(current)]
        if len(current) == 48:
            expected.append(current)
            current = []
        if len(expected) == len(windows):
            break
    assert windows == expected
