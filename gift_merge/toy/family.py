"""``build_toy_family``: a base, its instruct model and task data, built locally and deterministically.

The family exists so that GIFT's comparison can run offline on a CPU and still mean something: the base
is pretrained (briefly) on text that teaches the task's content, the instruct model is a small change of
it (a projected fine-tune, drift at most ``InstructSettings.max_drift`` per matrix) that answers in its
own style, and the task data answers the same kind of problems in another style. ``family.json`` records
how it was built and the measurements that say whether a comparison on it is meaningful (drift, quick
greedy scores, the instruct model's confidence on the task data); a second call with the same arguments
reads it and returns at once.

Deterministic for a fixed seed and thread count: every stage runs under ``torch.set_num_threads(threads)``
(float reductions depend on the thread split, so another count builds another family).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from gift_merge.toy import measure, problems, scoring
from gift_merge.toy.instruct import InstructSettings, instruct_rows, instruct_tune
from gift_merge.toy.pretrain import PretrainSettings, pretrain
from gift_merge.toy.vocabulary import build_tokenizer

FAMILY_VERSION = 2
"""Bumped whenever a change of this package changes what a build writes, so caches are rebuilt."""

TASK_TRAIN_ROWS = 300
INSTRUCT_ROWS = 2000
CHECK_ROWS = 64
"""Held-out rows of each kind the build scores greedily for ``family.json`` (lm-eval scores more)."""

GATES = {"max_drift": 0.03, "instruct_task_content": 0.5, "instruct_instruction_acc": 0.5}
"""What the family itself must satisfy: the instruct model is a small change of the base and competent
on both the task's content and the instructions (the transfer gate needs trained adapters; see
:mod:`gift_merge.toy.gates`)."""


@contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """Run with exactly ``threads`` torch threads, restoring the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def settings_for(steps_scale: float) -> tuple[PretrainSettings, InstructSettings, int, int]:
    """Pretraining and instruct settings, task rows and check rows; ``steps_scale`` < 1 shrinks the build
    (steps and rows) for tests, where only determinism and file layout matter."""
    pre = PretrainSettings()
    inst = InstructSettings()
    if steps_scale == 1.0:
        return pre, inst, TASK_TRAIN_ROWS, CHECK_ROWS
    pre = dataclasses.replace(
        pre, steps=max(2, round(pre.steps * steps_scale)), warmup=max(1, round(pre.warmup * steps_scale))
    )
    inst = dataclasses.replace(
        inst, steps=max(2, round(inst.steps * steps_scale)), rows=max(64, round(inst.rows * steps_scale))
    )
    return pre, inst, max(16, round(TASK_TRAIN_ROWS * steps_scale)), max(4, round(CHECK_ROWS * steps_scale))


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def _paths(root: Path) -> dict[str, Path]:
    return {
        "base": root / "base",
        "instruct": root / "instruct",
        "task_train": root / "data" / "task_train.jsonl",
        "instruct_train": root / "data" / "instruct_train.jsonl",
        "family": root / "family.json",
    }


def build_toy_family(root: Path, *, seed: int = 0, threads: int = 2, steps_scale: float = 1.0) -> dict[str, Path]:
    """Write ``root/base``, ``root/instruct`` (checkpoints with tokenizer and chat template), ``root/data``
    (``task_train.jsonl``: task-style ``{instruction, response, answer}`` rows; ``instruct_train.jsonl``:
    the instruct step's data) and ``root/family.json``; return those paths by name.

    Reuses an existing build whose ``family.json`` records the same arguments and version.
    """
    root = Path(root)
    paths = _paths(root)
    key = {"version": FAMILY_VERSION, "seed": seed, "threads": threads, "steps_scale": steps_scale}
    if paths["family"].is_file() and all(p.exists() for p in paths.values()):
        recorded = json.loads(paths["family"].read_text())
        if recorded.get("key") == key:
            return paths
    pre, inst, task_n, check_n = settings_for(steps_scale)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    with pinned_threads(threads):
        tokenizer = build_tokenizer()
        base, pre_losses = pretrain(tokenizer, pre, seed)
        seconds["pretrain"] = round(time.perf_counter() - started, 1)

        mark = time.perf_counter()
        instruct_data = instruct_rows(inst.rows, seed, inst.problem_share)
        instruct, inst_losses = instruct_tune(copy.deepcopy(base), tokenizer, instruct_data, inst, seed)
        seconds["instruct"] = round(time.perf_counter() - mark, 1)

        mark = time.perf_counter()
        task_train = problems.task_rows(task_n, seed)
        for name in ("base", "instruct"):
            if paths[name].exists():
                shutil.rmtree(paths[name])
        for name, model in (("base", base), ("instruct", instruct)):
            model.save_pretrained(paths[name])
            tokenizer.save_pretrained(paths[name])
        _write_jsonl(paths["task_train"], task_train)
        _write_jsonl(paths["instruct_train"], instruct_data)
        seconds["write"] = round(time.perf_counter() - mark, 1)

        mark = time.perf_counter()
        checks = _measure(base, instruct, tokenizer, task_train, check_n)
        seconds["measure"] = round(time.perf_counter() - mark, 1)
    seconds["total"] = round(time.perf_counter() - started, 1)
    record: dict[str, Any] = {
        "key": key,
        "seconds": seconds,
        "sizes": {
            "parameters": sum(p.numel() for p in base.parameters()),
            "vocabulary": len(tokenizer),
            "task_train_rows": len(task_train),
            "instruct_rows": len(instruct_data),
            "pretrain_tokens": pre.steps * pre.batch_size * pre.length,
        },
        "pretrain": {**dataclasses.asdict(pre), "losses": pre_losses},
        "instruct": {**dataclasses.asdict(inst), "losses": inst_losses},
        **checks,
    }
    paths["family"].write_text(json.dumps(record, indent=2) + "\n")
    return paths


def _measure(
    base: Any, instruct: Any, tokenizer: Any, task_train: list[dict[str, str]], check_n: int
) -> dict[str, Any]:
    """Drift, greedy scores of both models on held-out rows, q_t on the task data, and the family gates."""
    task_check = problems.task_rows(check_n, problems.EVAL_SEED, held_out=True)
    instruction_check = problems.instruction_rows(check_n, problems.EVAL_SEED, held_out=True)
    scores = {
        name: {
            "task": measure.mean_scores(model, tokenizer, task_check, scoring.score_task),
            "instruction": measure.mean_scores(model, tokenizer, instruction_check, scoring.score_instruction),
        }
        for name, model in (("base", base), ("instruct", instruct))
    }
    per_matrix = measure.drift(base, instruct)
    max_drift = max(per_matrix.values(), default=0.0)
    drift = {"max_matrix": max_drift, "layers": measure.layer_drift(base, instruct)}
    q = measure.confidence(instruct, tokenizer, task_train)
    observed: dict[str, float] = {
        "max_drift": max_drift,
        "instruct_task_content": scores["instruct"]["task"]["content"],
        "instruct_instruction_acc": scores["instruct"]["instruction"]["acc"],
    }
    gates = {
        name: {
            "value": observed[name],
            "threshold": limit,
            "passed": observed[name] <= limit if name == "max_drift" else observed[name] >= limit,
        }
        for name, limit in GATES.items()
    }
    return {"scores": scores, "drift": drift, "confidence": q, "gates": gates}
