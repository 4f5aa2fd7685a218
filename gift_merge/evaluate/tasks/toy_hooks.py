"""The functions ``toy_task.yaml`` and ``toy_instruct.yaml`` name: held-out rows of the toy family and
their scoring.

The rows are generated, not read: :mod:`gift_merge.toy.problems` makes them from a fixed seed and keeps
only questions its hash-based split holds out, which no training generator of any toy family emits. So
the tasks need no data files and cannot overlap what a toy model was trained on.

lm-eval imports this file by its path, so it uses absolute imports only (``keep_all_responses``, the
YAML's filter, is the shipped tasks' own, imported here); loaders accept and ignore the
keyword arguments lm-eval passes from the task metadata (a prompt preset does not apply to toy models).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from datasets import Dataset, DatasetDict

from gift_merge.evaluate.tasks.hooks import keep_all_responses as keep_all_responses  # the YAML names it here
from gift_merge.evaluate.tasks.hooks import responses_of
from gift_merge.toy.problems import EVAL_SEED, instruction_rows, task_rows
from gift_merge.toy.scoring import score_instruction, score_task

EVAL_ROWS = 200
"""Held-out rows per task; ``--limit`` takes the first N."""


def load_task(**_: Any) -> DatasetDict:
    """Held-out word problems of two or three steps: ``instruction``, ``response`` (the task-style gold
    solution), ``answer`` (the final number)."""
    return DatasetDict({"test": Dataset.from_list(task_rows(EVAL_ROWS, EVAL_SEED, held_out=True))})


def load_instruct(**_: Any) -> DatasetDict:
    """Held-out instructions: ``instruction``, ``response`` (instruct-style gold answer), ``answer``."""
    return DatasetDict({"test": Dataset.from_list(instruction_rows(EVAL_ROWS, EVAL_SEED, held_out=True))})


def doc_prompt(doc: dict[str, Any]) -> str:
    """The question as the user's message; the chat template wraps it."""
    return doc["instruction"]


def _mean_scores(results: Sequence[Any], gold: str, score: Callable[[str, str], dict[str, float]]) -> dict[str, float]:
    """Each metric averaged over the K responses."""
    scored = [score(response, gold) for response in responses_of(results)]
    return {key: statistics.fmean(s[key] for s in scored) for key in scored[0]}


def score_toy_task(doc: dict[str, Any], results: Sequence[Any]) -> dict[str, float]:
    """``content`` (final number right), ``format`` (task style), ``acc`` (both)."""
    return _mean_scores(results, doc["answer"], score_task)


def score_toy_instruct(doc: dict[str, Any], results: Sequence[Any]) -> dict[str, float]:
    """``content`` (stated answer right), ``format`` (instruct style), ``acc`` (both)."""
    return _mean_scores(results, doc["answer"], score_instruction)
