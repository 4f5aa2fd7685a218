"""results.py and report.py: summaries against numpy, the formatted tables, and the csv/json round trips."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest

from gift_merge.compare.report import terminal_table, write_tables
from gift_merge.compare.results import ArmRecord, Comparison, Score, metric_label
from tests.compare.conftest import realistic_comparison


def _table_rows(markdown: str, section: str) -> dict[str, list[str]]:
    """The rows of the first table under ``## section``, keyed by their first cell."""
    body = markdown.split(f"## {section}\n", 1)[1]
    rows = {}
    for line in body.splitlines():
        if line.startswith("## "):
            break
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            if cells[0] != "Arm":  # the header
                rows[cells[0]] = cells[1:]
    return rows


def _expected_cell(values: list[float]) -> str:
    array = np.asarray(values, dtype=np.float64)
    return f"{100 * array.mean():.1f} ± {100 * array.std(ddof=1):.1f}"


def test_summary_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    scores, expected = [], {}
    for arm in ("a", "b"):
        for task in ("t1", "t2"):
            n = int(rng.integers(2, 7))
            values = rng.random(n)
            seeds = rng.permutation(100)[:n]  # seeds out of order, as parallel evaluations finish
            scores += [Score(arm, task, "acc", int(s), float(v)) for s, v in zip(seeds, values, strict=True)]
            expected[arm, task] = (values.mean(), values.std(ddof=1), n)
    scores.append(Score("a", "t3", "acc", 0, 0.25))
    comparison = Comparison(
        [ArmRecord("a", "x"), ArmRecord("b", "y")], scores, ["t1", "t2", "t3"], dict.fromkeys(["t1", "t2", "t3"], "acc")
    )
    for (arm, task), (mean, spread, n) in expected.items():
        got = comparison.summary(arm, task, "acc")
        assert got[2] == n
        assert got[0] == pytest.approx(mean, rel=1e-12, abs=1e-15)
        assert got[1] == pytest.approx(spread, rel=1e-12, abs=1e-15)
    assert comparison.summary("a", "t3", "acc") == (0.25, 0.0, 1)  # one seed: no spread
    mean, spread, n = comparison.summary("b", "t3", "acc")
    assert n == 0 and math.isnan(mean) and math.isnan(spread)


@pytest.mark.parametrize(
    ("metric", "samples", "label"),
    [
        ("acc", 1, "acc"),
        ("acc", 4, "avg@4"),
        ("pass_at_k", 8, "pass@8"),
        ("maj_at_k", 8, "maj@8"),
        ("pass_at_k", 1, "pass@1"),
        ("rougeL", 4, "rougeL"),
    ],
)
def test_metric_label(metric: str, samples: int, label: str) -> None:
    assert metric_label(metric, samples) == label


def test_markdown_numbers_deltas_and_bold(realistic: Comparison, tmp_path) -> None:
    markdown = write_tables(realistic, tmp_path)["md"].read_text(encoding="utf-8")
    rows = _table_rows(markdown, "Results")
    ranked = [arm.name for arm in realistic.arms if not arm.gate]
    assert list(rows) == ["instruct (ref)", *ranked[1:]]  # recipe order, gates apart
    n_tasks = len(realistic.tasks)
    for t, task in enumerate(realistic.tasks):
        metric = realistic.headline[task]
        means = {arm: np.mean(realistic.values(arm, task, metric)) for arm in ranked}
        best = max(means, key=lambda arm: means[arm])
        for arm in ranked:
            cells = rows[f"{arm} (ref)" if arm == "instruct" else arm]
            expected = _expected_cell(realistic.values(arm, task, metric))
            assert cells[t] == (f"**{expected}**" if arm == best else expected)
            delta = 100 * (means[arm] - means["instruct"])
            assert cells[n_tasks + t] == ("—" if arm == "instruct" else f"{delta:+.1f}")
    assert rows["gift"][-2:] == ["622.4", f"{int(3.1 * 2**30) / 2**30:.2f}"]
    assert rows["instruct (ref)"][-2:] == ["—", "—"]
    gates = _table_rows(markdown, "Sanity checks")
    assert list(gates) == ["self-merge"]
    assert "**" not in "".join(gates["self-merge"])  # gates are not ranked, so never marked best
    assert markdown.index("## Sanity checks") < markdown.index("## Results") < markdown.index("## Ranking")
    assert "-0.0" not in markdown
    assert "- `gift_gsm8k` (target): `avg@4` (`acc`)" in markdown
    every = _table_rows(markdown, "All metrics")
    assert every["gift"][1] == _expected_cell(realistic.values("gift", "gift_gsm8k", "pass_at_k"))


def test_ranking_order(realistic: Comparison, tmp_path) -> None:
    ranked = [arm.name for arm in realistic.arms if not arm.gate]
    overall = {
        arm: np.mean([np.mean(realistic.values(arm, t, realistic.headline[t])) for t in realistic.tasks])
        for arm in ranked
    }
    expected = sorted(ranked, key=lambda arm: (-overall[arm], ranked.index(arm)))
    assert [name for name, _ in realistic.ranking()] == expected
    markdown = write_tables(realistic, tmp_path)["md"].read_text(encoding="utf-8")
    listed = re.findall(r"^\d+\. (.+) — ([\d.]+)$", markdown, flags=re.MULTILINE)
    assert [name for name, _ in listed] == expected
    assert [float(v) for _, v in listed] == [round(100 * overall[a], 1) for a in expected]


def test_ranking_ties_keep_recipe_order_and_incomplete_arms_go_last() -> None:
    tasks = ["t1", "t2"]
    scores = [
        Score(arm, t, "acc", 0, v)
        for arm, t, v in [
            ("c", "t1", 0.9),
            ("a", "t1", 0.5),
            ("a", "t2", 0.5),
            ("b", "t1", 0.4),
            ("b", "t2", 0.6),
            ("d", "t1", 0.1),
            ("d", "t2", 0.1),
        ]
    ]
    arms = [ArmRecord(name, "x") for name in ("a", "b", "c", "d", "e")]
    comparison = Comparison(arms, scores, tasks, dict.fromkeys(tasks, "acc"))
    names = [name for name, _ in comparison.ranking()]
    assert names == ["a", "b", "d", "c", "e"]  # a and b tie at 0.5; c lacks t2; e has no scores


def test_csv_round_trips(realistic: Comparison, tmp_path) -> None:
    path = write_tables(realistic, tmp_path)["csv"]
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [
        "arm",
        "task",
        "metric",
        "seed",
        "value",
        "build_seconds",
        "peak_rss_bytes",
        "eval_seconds",
        "sweep.lambda",
    ]
    assert len(rows) == len(realistic.scores)
    for row, score in zip(rows, realistic.scores, strict=True):
        assert Score(row["arm"], row["task"], row["metric"], int(row["seed"]), float(row["value"])) == score
        arm = realistic.arm(score.arm)
        assert (float(row["build_seconds"]) if row["build_seconds"] else None) == arm.build_seconds
        assert (int(row["peak_rss_bytes"]) if row["peak_rss_bytes"] else None) == arm.peak_rss_bytes
        assert (float(row["eval_seconds"]) if row["eval_seconds"] else None) == arm.eval_seconds
        assert (float(row["sweep.lambda"]) if row["sweep.lambda"] else None) == (arm.sweep or {}).get("lambda")


def test_json_round_trips_and_is_stable(realistic: Comparison, tmp_path) -> None:
    path = write_tables(realistic, tmp_path)["json"]
    text = path.read_text(encoding="utf-8")
    assert Comparison.from_json(json.loads(text)) == realistic
    assert Comparison.load(path) == realistic
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert write_tables(realistic_comparison(), tmp_path / "again")["json"].read_text(encoding="utf-8") == text


def test_single_seed_shows_mean_only_and_no_reference_drops_deltas(tmp_path) -> None:
    comparison = Comparison(
        [ArmRecord("a", "x"), ArmRecord("b", "y")],
        [Score("a", "t", "acc", 0, 0.5), Score("b", "t", "acc", 0, 0.25)],
        ["t"],
        {"t": "acc"},
    )
    rows = _table_rows(write_tables(comparison, tmp_path)["md"].read_text(encoding="utf-8"), "Results")
    assert rows == {"a": ["**50.0**", "—", "—"], "b": ["25.0", "—", "—"]}


def test_terminal_table_fits_and_is_plain(realistic: Comparison) -> None:
    realistic.arms.append(ArmRecord("dare_ties density=0.5 w=1.0 (long)", "dare_ties (inline)", build_seconds=1.0))
    text = terminal_table(realistic)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120
    assert "\x1b" not in text
    assert "sanity checks" in text and "self-merge" in text
    body = [line.split("  ")[0] for line in lines[4:] if line and not line.startswith(("-", "sanity", "ranking", " "))]
    assert body[0] == "self-merge"
    assert body[1:4] == ["instruct (ref)", "instruct-sft", "shadow-ft"]
    columns = {line.index("±") for line in lines if line.startswith(("instruct", "gift ", "ties"))}
    assert len(columns) == 1  # the first task's means line up


def test_validate_names_the_problem(realistic: Comparison) -> None:
    realistic.reference = "nope"
    with pytest.raises(ValueError, match="reference arm 'nope'"):
        terminal_table(realistic)


def test_a_failed_gate_withholds_the_ranking(realistic) -> None:
    import dataclasses

    from gift_merge.compare.report import markdown, terminal_table
    from gift_merge.compare.results import Gate

    arm = realistic.ranked_arms[1].name
    task = realistic.tasks[0]
    metric = realistic.headline[task]
    mean = realistic.summary(arm, task, metric)[0]
    passing = Gate(arm, task, metric, minimum=mean - 0.01, why="keeps the format", value=mean)
    failing = dataclasses.replace(passing, minimum=mean + 0.01)
    realistic.gates = [passing]
    assert "## Ranking\n\nBy the mean" in markdown(realistic)
    assert f"pass  {arm} {task} {metric} = {mean:.3f}" in terminal_table(realistic)
    realistic.gates = [passing, failing]
    text, table = markdown(realistic), terminal_table(realistic)
    assert (
        "**FAIL**" in text
        and "Withheld: a sanity gate failed" in text
        and "1. " not in text.split("## Ranking")[1].split("##")[0]
    )
    assert "ranking withheld" in table and "ranking (mean headline score)" not in table
    from gift_merge.compare.results import Comparison

    assert Comparison.from_json(realistic.to_json()).gates == realistic.gates
