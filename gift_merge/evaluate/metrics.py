"""Scoring math for the shipped evaluation tasks, kept apart from lm-eval so it can be tested alone.

Everything here is plain Python over strings: pull the final answer out of a chain of thought, decide
whether two math answers are equal, and turn K sampled responses to one problem into the per-problem
numbers that lm-eval then averages over problems (``aggregation: mean``):

* Average@K — mean correctness of the K samples; at K = 1 it is plain (greedy) accuracy.
* pass@K — 1 if at least one of the K samples is correct, the GIFT authors' definition; its mean over
  problems is the fraction of problems solved by some sample.
* maj@K — 1 if the majority-vote answer of the K samples is correct.

``math_verify`` and ``rouge_score`` are imported on first use, so importing this module costs nothing
and needs neither installed; only the functions that compare math answers or compute ROUGE do.
"""

from __future__ import annotations

import operator
import re
import threading
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

MATH_VERIFY_TIMEOUT_S = 5
"""Seconds math_verify may spend parsing or comparing one answer, where it can enforce a limit at all."""

_BOXED = re.compile(r"\\boxed\s*\{")
_HASH_ANSWER = re.compile(r"####[ \t]*([^\n]*)")
_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d,])")
_PERCENT = re.compile(r"\s*\\?%$")


def extract_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` in ``text``, matched by brace depth, or None.

    Depth matching is what lets answers such as ``\boxed{\frac{1}{2}}`` come out whole; a box whose
    closing brace never arrives (a generation cut off mid-answer) does not count as an answer.
    """
    for match in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for i in range(match.end(), len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[match.end() : i].strip()
    return None


def extract_hash_answer(text: str) -> str | None:
    """What follows the last ``####`` on its line (GSM8K's answer marker), or None when absent or empty."""
    matches = _HASH_ANSWER.findall(text)
    if not matches or not matches[-1].strip():
        return None
    return matches[-1].strip()


def extract_answer(text: str) -> str | None:
    r"""The final answer of a chain of thought: the last ``\boxed{}``, else the last ``#### N``, else None.

    The boxed form is what the prompt asks for; ``####`` is GSM8K's reference format, which models
    fine-tuned on GSM8K-style data tend to produce instead.
    """
    boxed = extract_boxed(text)
    return boxed if boxed is not None else extract_hash_answer(text)


def normalize_answer(answer: str) -> str:
    """Answer text with the decoration that never changes its value removed, for math_verify to parse.

    Drops surrounding whitespace and ``$`` signs, a trailing full stop, a trailing percent sign (the
    data sets' gold answers are bare numbers even when the question asks for a percentage) and the
    commas of thousands separators (``1,234`` → ``1234``; ``2,3`` is left alone, it may be a pair).
    """
    text = answer.strip().strip("$").strip()
    text = text.removeprefix("\\$").strip()
    text = text.rstrip(".").strip()
    text = _PERCENT.sub("", text)
    return _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), text)


def _timeout_seconds() -> int | None:
    """math_verify's time limit for this thread: it enforces limits with SIGALRM, which only the main thread may use.

    Passing None elsewhere (lm-eval or a caller may score from worker threads) turns the limit off
    instead of failing with ``ValueError: signal only works in main thread``.
    """
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=8192)
def _parse(answer: str) -> tuple[Any, ...]:
    """math_verify's parse of one normalised answer; cached, as voting compares each answer many times."""
    from math_verify import parse

    return tuple(parse(f"${normalize_answer(answer)}$", parsing_timeout=_timeout_seconds()))


def math_equal(gold: str, prediction: str | None) -> bool:
    r"""Whether ``prediction`` has the value of ``gold`` according to math_verify (``\frac{1}{2}`` = ``0.5``).

    math_verify's comparison is not symmetric (the gold side decides how assignments and intervals
    are read), so the reference answer goes first. An answer it cannot parse is wrong.
    """
    if prediction is None:
        return False
    from math_verify import verify

    gold_parsed, prediction_parsed = _parse(gold), _parse(prediction)
    if not gold_parsed or not prediction_parsed:
        return False
    return bool(verify(list(gold_parsed), list(prediction_parsed), timeout_seconds=_timeout_seconds()))


def average_at_k(correct: Sequence[bool]) -> float:
    """Average@K = (1/K) Σᵢ correctᵢ: the expected accuracy of one sample; greedy accuracy when K = 1."""
    if not correct:
        raise ValueError("average_at_k needs at least one sample")
    return sum(bool(c) for c in correct) / len(correct)


def pass_at_k(correct: Sequence[bool]) -> float:
    """pass@K = 1 if any of the K samples is correct, else 0 (averaged over problems by the caller)."""
    if not correct:
        raise ValueError("pass_at_k needs at least one sample")
    return float(any(correct))


def majority_vote(answers: Sequence[str | None], same: Callable[[str, str], bool] = operator.eq) -> str | None:
    """The answer given most often, None when no sample has one.

    Answers are grouped by ``same`` (each joins the first earlier group whose first answer it equals),
    a group's size is its vote count, and a tie goes to the group that appeared first. None (no
    extractable answer) never votes.
    """
    groups: list[tuple[str, int]] = []
    for answer in answers:
        if answer is None:
            continue
        for index, (representative, votes) in enumerate(groups):
            if same(representative, answer):
                groups[index] = (representative, votes + 1)
                break
        else:
            groups.append((answer, 1))
    if not groups:
        return None
    best = max(votes for _, votes in groups)
    return next(representative for representative, votes in groups if votes == best)


def math_sample_scores(responses: Sequence[str], gold: str) -> dict[str, float]:
    r"""``acc`` (Average@K), ``pass_at_k`` and ``maj_at_k`` of K responses to one problem with answer ``gold``.

    Each response's answer is :func:`extract_answer`'s; votes are grouped by :func:`math_equal`, so
    ``0.5`` and ``\frac{1}{2}`` count as the same answer.
    """
    answers = [extract_answer(response) for response in responses]
    correct = [math_equal(gold, answer) for answer in answers]
    majority = majority_vote(answers, same=math_equal)
    return {
        "acc": average_at_k(correct),
        "pass_at_k": pass_at_k(correct),
        "maj_at_k": float(math_equal(gold, majority)),
    }


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    """One shared RougeScorer; building it loads rouge_score's tokenizer, which is not free."""
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"])


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F-measure of ``prediction``, the best over ``references``.

    F = 2·P·R / (P + R) with P = LCS/|prediction| and R = LCS/|reference|, LCS the longest common
    subsequence of tokens. Tokens are rouge_score's default: lower-cased runs of ``[a-z0-9]``, no
    stemming, so text in other scripts has no tokens and scores 0.
    """
    refs = [references] if isinstance(references, str) else list(references)
    scorer = _rouge_scorer()
    return max(scorer.score(reference, prediction)["rougeL"].fmeasure for reference in refs)


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if ``prediction`` equals any reference once surrounding whitespace is stripped, else 0.0."""
    refs = [references] if isinstance(references, str) else list(references)
    return float(any(prediction.strip() == reference.strip() for reference in refs))


def text_sample_scores(responses: Sequence[str], references: str | Sequence[str]) -> dict[str, float]:
    """``rougeL`` and ``exact_match`` of K responses to one instruction, each averaged over the K."""
    if not responses:
        raise ValueError("text_sample_scores needs at least one sample")
    return {
        "rougeL": sum(rouge_l(response, references) for response in responses) / len(responses),
        "exact_match": sum(exact_match(response, references) for response in responses) / len(responses),
    }
