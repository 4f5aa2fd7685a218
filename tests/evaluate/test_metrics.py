"""Scoring math of the shipped tasks, checked against plain-Python references written here."""

from __future__ import annotations

import random
import subprocess
import sys
import threading

import pytest

pytest.importorskip("math_verify")  # the eval extra's scoring libraries
pytest.importorskip("rouge_score")

from gift_merge.evaluate.metrics import (
    average_at_k,
    exact_match,
    extract_answer,
    extract_boxed,
    extract_hash_answer,
    majority_vote,
    math_equal,
    math_sample_scores,
    normalize_answer,
    pass_at_k,
    rouge_l,
    text_sample_scores,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{18}.", "18"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\text{x}^{2}+{1}}", r"\text{x}^{2}+{1}"),
        (r"first \boxed{3}, then \boxed{4}, finally \boxed{5}", "5"),
        (r"\boxed {7}", "7"),
        (r"\boxed{ 42 }", "42"),
        (r"earlier \boxed{6} and a cut-off \boxed{\frac{1}{", "6"),
        ("no box here", None),
        (r"\boxed{unclosed", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


def test_extract_hash_answer_takes_the_last_marker() -> None:
    assert extract_hash_answer("#### 3\nwait, no\n#### 1,234") == "1,234"
    assert extract_hash_answer("She makes 9 * 2 = $18.\n#### 18") == "18"
    assert extract_hash_answer("####   \n") is None
    assert extract_hash_answer("no marker") is None


def test_extract_answer_prefers_the_box() -> None:
    assert extract_answer("#### 5\n" + r"\boxed{6}") == "6"
    assert extract_answer("work\n#### 1,234") == "1,234"
    assert extract_answer("I do not know") is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1,234", "1234"),
        ("$1,234,567.5$", "1234567.5"),
        ("2,3", "2,3"),
        (r"\$18", "18"),
        ("18.", "18"),
        (r"20\%", "20"),
        (" 7 ", "7"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("gold", "prediction", "expected"),
    [
        (r"\frac{1}{2}", "0.5", True),
        ("0.5", r"\frac{1}{2}", True),
        ("72", "72.0", True),
        ("1234", "1,234", True),
        ("2,125", "2125", True),
        ("18", r"\$18", True),
        ("145", "145.0", True),
        ("72", "73", False),
        ("72", "7.2", False),
        (r"\frac{1}{2}", "0.25", False),
        ("72", "banana", False),
        ("72", "", False),
        ("72", None, False),
    ],
)
def test_math_equal(gold: str, prediction: str | None, expected: bool) -> None:
    assert math_equal(gold, prediction) is expected


def test_math_equal_works_off_the_main_thread() -> None:
    """math_verify's SIGALRM timeout raises in worker threads unless it is switched off there."""
    outcome: list[object] = []

    def check() -> None:
        try:
            outcome.append((math_equal(r"\frac{3}{4}", "0.75"), math_equal("0.75", r"\frac{3}{5}")))
        except Exception as error:  # surfaced below as the test's failure
            outcome.append(error)

    worker = threading.Thread(target=check)
    worker.start()
    worker.join(timeout=60)
    assert outcome == [(True, False)]


def test_metrics_import_needs_no_harness() -> None:
    code = "import sys, gift_merge.evaluate.metrics; print(sorted({'lm_eval', 'math_verify', 'rouge_score'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _reference_majority(answers: list[str | None]) -> str | None:
    """Most frequent non-None answer, ties to the earliest first appearance."""
    votes = [a for a in answers if a is not None]
    if not votes:
        return None
    counts = {a: votes.count(a) for a in votes}
    top = max(counts.values())
    return min((a for a in counts if counts[a] == top), key=votes.index)


def test_sampled_metrics_against_plain_python() -> None:
    rng = random.Random(0)
    for _ in range(300):
        k = rng.randint(1, 9)
        correct = [rng.random() < 0.4 for _ in range(k)]
        assert average_at_k(correct) == pytest.approx(sum(correct) / k)
        assert pass_at_k(correct) == (1.0 if True in correct else 0.0)
        answers = [rng.choice(["1", "2", "3", None]) for _ in range(k)]
        assert majority_vote(answers) == _reference_majority(answers)


def test_math_sample_scores_against_plain_python() -> None:
    rng = random.Random(1)
    gold = "2"
    for _ in range(60):
        k = rng.randint(1, 8)
        answers = [rng.choice(["1", "2", "2", "3", None]) for _ in range(k)]
        responses = ["I give up" if a is None else f"steps... \\boxed{{{a}}}" for a in answers]
        scores = math_sample_scores(responses, gold)
        hits = [a == gold for a in answers]
        assert scores["acc"] == pytest.approx(sum(hits) / k)
        assert scores["pass_at_k"] == float(any(hits))
        assert scores["maj_at_k"] == float(_reference_majority(answers) == gold)


def test_majority_groups_equal_values() -> None:
    """0.5 and 1/2 are one answer with two votes, beating 1's single vote that came first."""
    responses = [r"\boxed{1}", r"\boxed{0.5}", r"\boxed{\frac{1}{2}}"]
    assert math_sample_scores(responses, r"\frac{1}{2}") == {
        "acc": pytest.approx(2 / 3),
        "pass_at_k": 1.0,
        "maj_at_k": 1.0,
    }
    assert math_sample_scores(["no answer", "none"], "3") == {"acc": 0.0, "pass_at_k": 0.0, "maj_at_k": 0.0}


def test_empty_samples_are_refused() -> None:
    for metric in (average_at_k, pass_at_k):
        with pytest.raises(ValueError):
            metric([])
    with pytest.raises(ValueError):
        text_sample_scores([], "ref")


def _reference_rouge_l(prediction: str, reference: str) -> float:
    """LCS F-measure over whitespace tokens, by dynamic programming."""
    p, r = prediction.split(), reference.split()
    table = [[0] * (len(r) + 1) for _ in range(len(p) + 1)]
    for i in range(len(p)):
        for j in range(len(r)):
            table[i + 1][j + 1] = table[i][j] + 1 if p[i] == r[j] else max(table[i][j + 1], table[i + 1][j])
    lcs = table[-1][-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def test_rouge_l_against_lcs_reference() -> None:
    rng = random.Random(2)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "42", "x7"]
    for _ in range(200):
        prediction = " ".join(rng.choices(words, k=rng.randint(1, 12)))
        references = [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 3))]
        expected = max(_reference_rouge_l(prediction, ref) for ref in references)
        assert rouge_l(prediction, references) == pytest.approx(expected)
    assert rouge_l("The Cat, sat!", "the cat sat") == pytest.approx(1.0)  # rouge_score lower-cases, drops punctuation
    assert rouge_l("", "the cat") == 0.0


def test_exact_match_and_averaging() -> None:
    assert exact_match("  Paris\n", "Paris") == 1.0
    assert exact_match("paris", "Paris") == 0.0
    assert exact_match("b", ["a", "b"]) == 1.0
    scores = text_sample_scores(["the cat sat", "dog"], "the cat sat")
    assert scores["exact_match"] == pytest.approx(0.5)
    assert scores["rougeL"] == pytest.approx(0.5)
