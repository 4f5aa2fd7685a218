r"""The functions the shipped task YAMLs name with ``!function hooks.<name>``: data, prompts, scoring.

lm-eval imports this file by its path (a module named after the path, not
``gift_merge.evaluate.tasks.hooks``), so it uses absolute imports only. Scoring math lives in
:mod:`gift_merge.evaluate.metrics`; what is here only adapts lm-eval's calling conventions to it:

* ``custom_dataset`` is called as ``loader(**metadata, **dataset_kwargs)`` and must return a
  ``datasets.DatasetDict``; metadata can carry anything (model arguments, a version), so loaders
  accept and ignore keyword arguments. The one they read is ``prompt_preset``, which gift-merge puts in
  the TaskManager's metadata for ``--prompt-preset``: doc_to_text has no access to run settings, so each
  loader writes the finished prompt of every row into a ``prompt`` column, which the YAMLs prompt with.
* With the ``all`` filter (:func:`keep_all_responses`), ``process_results(doc, results)`` gets
  ``results[0]`` = the list of the K responses of a task run with ``repeats: K``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from gift_merge.errors import GiftMergeError
from gift_merge.evaluate.metrics import extract_hash_answer, math_sample_scores, text_sample_scores
from gift_merge.train.prompts import fill_template, format_prompt, preset_template

DATA_DIR = Path(__file__).parent / "data"
"""The jsonl slices; resolved from this file so the tasks run from any working directory, offline."""

COT_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
"""What the GIFT authors append to every math question: ask for a chain of thought and a boxed answer."""

CHOICE_LETTERS = ("A", "B", "C", "D")
"""Labels of MMLU's four options, in order; the model is scored on the log-likelihood of each."""


def _load(filename: str, question: Callable[[dict[str, Any]], str], wrap: Callable[[str], str]) -> DatasetDict:
    """The rows of ``data/<filename>`` as the ``test`` split (the only one: the tasks are zero-shot), each
    with its ``prompt``: ``wrap(question(row))``."""
    with (DATA_DIR / filename).open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    for row in rows:
        row["prompt"] = wrap(question(row))
    return DatasetDict({"test": Dataset.from_list(rows)})


def math_prompt(prompt_preset: str | None) -> Callable[[str], str]:
    """Question → prompt of a math task: the question and the authors' suffix, as the user message a chat
    template wraps; with a preset, the authors' whole prompt (:func:`~gift_merge.train.prompts.format_prompt`,
    which carries the suffix itself), byte for byte what annotation and training saw."""
    if prompt_preset is None:
        return lambda question: question + COT_SUFFIX
    preset_template(prompt_preset, "prompt_preset")  # an unknown name fails here, not on the first row
    return lambda question: format_prompt(prompt_preset, question)


def plain_prompt(prompt_preset: str | None) -> Callable[[str], str]:
    """Text → prompt of a task that is not math (MMLU, Super-NI): the text as it is; with a preset, the
    preset's wrapping (system prompt, turn markers) around it without the math suffix, since asking for
    steps and a ``\\boxed{}`` answer would change what these tasks measure."""
    if prompt_preset is None:
        return lambda text: text
    template = preset_template(prompt_preset, "prompt_preset")
    if template.count(COT_SUFFIX) != 1:
        raise GiftMergeError(f"prompt_preset: {prompt_preset!r} does not end its question with the math suffix once")
    wrapping = template.replace(COT_SUFFIX, "")
    return lambda text: fill_template(wrapping, text)


def doc_prompt(doc: dict[str, Any]) -> str:
    """The prompt the loader built for this row (see :func:`math_prompt`, :func:`plain_prompt`)."""
    return doc["prompt"]


def load_gsm8k(prompt_preset: str | None = None, **_: Any) -> DatasetDict:
    """GSM8K test slice: ``question``, ``answer`` (worked solution ending in ``#### N``), ``prompt``."""
    return _load("gsm8k_test.jsonl", gsm8k_question, math_prompt(prompt_preset))


def load_svamp(prompt_preset: str | None = None, **_: Any) -> DatasetDict:
    """SVAMP test slice: ``Body``, ``Question``, ``Answer`` (a float such as 145.0), ``prompt``."""
    return _load("svamp_test.jsonl", svamp_question, math_prompt(prompt_preset))


def load_mmlu_stem(prompt_preset: str | None = None, **_: Any) -> DatasetDict:
    """MMLU STEM slice: ``question``, four ``choices``, ``answer`` (index of the right choice), ``prompt``."""
    return _load("mmlu_stem_test.jsonl", mmlu_question, plain_prompt(prompt_preset))


def load_sni(prompt_preset: str | None = None, **_: Any) -> DatasetDict:
    """Super-NaturalInstructions held-out slice: ``instruction`` (definition + input), ``response``, ``prompt``."""
    return _load("sni_gen.jsonl", lambda row: row["instruction"], plain_prompt(prompt_preset))


def gsm8k_question(doc: dict[str, Any]) -> str:
    """The question as the data has it."""
    return doc["question"]


def gsm8k_gold(doc: dict[str, Any]) -> str:
    """The number after ``####`` in the reference solution (as written, e.g. ``2,125``)."""
    gold = extract_hash_answer(doc["answer"])
    if gold is None:
        raise ValueError(f"GSM8K row without a '#### N' answer: {doc['answer']!r}")
    return gold


def svamp_question(doc: dict[str, Any]) -> str:
    """Body and question joined by one space (bodies carry no trailing space)."""
    return f"{doc['Body'].strip()} {doc['Question'].strip()}"


def svamp_gold(doc: dict[str, Any]) -> str:
    """The answer as a number would be written: ``145`` for 145.0, ``2.5`` for 2.5."""
    answer = float(doc["Answer"])
    return str(int(answer)) if answer.is_integer() else repr(answer)


def mmlu_question(doc: dict[str, Any]) -> str:
    """Question, then one ``X. option`` line per choice, then ``Answer:`` to be followed by a letter."""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(CHOICE_LETTERS, doc["choices"], strict=True))
    return f"{doc['question'].strip()}\n{options}\nAnswer:"


def mmlu_choices(doc: dict[str, Any]) -> list[str]:
    """The letters the model chooses between (lm-eval puts its target delimiter, a space, before each)."""
    return list(CHOICE_LETTERS[: len(doc["choices"])])


def mmlu_gold(doc: dict[str, Any]) -> int:
    """Index of the right choice; the slice stores an int, a letter is accepted too for other MMLU exports."""
    answer = doc["answer"]
    if isinstance(answer, str) and not answer.strip().isdigit():
        return CHOICE_LETTERS.index(answer.strip().upper())
    return int(answer)


def keep_all_responses(resps: list[Any], docs: list[dict[str, Any]]) -> list[Any]:
    """lm-eval ``custom`` filter that keeps every one of the K responses (its default keeps only the first)."""
    return resps


def responses_of(results: Sequence[Any]) -> list[str]:
    """The K responses from ``process_results``' ``results`` (one string when run without the ``all`` filter)."""
    first = results[0]
    return [first] if isinstance(first, str) else list(first)


def score_gsm8k(doc: dict[str, Any], results: Sequence[Any]) -> dict[str, float]:
    """Average@K (``acc``), ``pass_at_k`` and ``maj_at_k`` of the responses to one GSM8K problem."""
    return math_sample_scores(responses_of(results), gsm8k_gold(doc))


def score_svamp(doc: dict[str, Any], results: Sequence[Any]) -> dict[str, float]:
    """Average@K (``acc``), ``pass_at_k`` and ``maj_at_k`` of the responses to one SVAMP problem."""
    return math_sample_scores(responses_of(results), svamp_gold(doc))


def score_sni(doc: dict[str, Any], results: Sequence[Any]) -> dict[str, float]:
    """``rougeL`` and ``exact_match`` against the reference response, averaged over the K responses."""
    return text_sample_scores(responses_of(results), doc["response"])
