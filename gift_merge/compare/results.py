"""The results of a ``gift-merge compare`` run: which arms were built, what each scored, and how to summarise it.

Every score is one (arm, task, metric, seed) value, a fraction in [0, 1]; tables and plots show them ×100.
A cell of the comparison is the mean over seeds with the sample standard deviation (ddof=1) as its spread.
``results.json`` holds a whole :class:`Comparison` (:meth:`Comparison.to_json`) and is also the cache a later
run reloads (:meth:`Comparison.from_json`), so the round trip must be exact.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# metrics computed from K samples per item: their label names K, as papers do
_SAMPLED_LABELS = {"acc": "avg@{k}", "pass_at_k": "pass@{k}", "maj_at_k": "maj@{k}"}


def metric_label(metric: str, samples: int) -> str:
    """How a metric is named in tables and plots: ``acc`` is ``avg@K`` (and ``pass_at_k`` ``pass@K``) when K > 1.

    With one sample, ``acc`` stays ``acc``; ``pass_at_k`` and ``maj_at_k`` read ``pass@1`` and ``maj@1`` (equal
    to accuracy, but still named apart so a table with both columns stays unambiguous).
    Other metrics (``rougeL``, ``f1``…) keep their names.
    """
    if metric == "acc" and samples <= 1:
        return "acc"
    template = _SAMPLED_LABELS.get(metric)
    return template.format(k=max(samples, 1)) if template else metric


@dataclass(frozen=True)
class Score:
    """One evaluation number: an arm's metric on a task for one seed."""

    arm: str
    task: str  # e.g. "gift_gsm8k"
    metric: str  # e.g. "acc", "pass_at_k", "rougeL"
    seed: int
    value: float


@dataclass
class ArmRecord:
    """One arm of the comparison (a merged model or trained adapter) and what building it cost."""

    name: str
    source: str  # one line saying what the arm is, e.g. "stage gift-merge", "model ../demo/models/instruct"
    build_seconds: float | None = None  # wall time to build the arm, summed over its stages; None when not built
    peak_rss_bytes: int | None = None  # peak resident memory while building; None when not built
    eval_seconds: float | None = None
    sweep: dict[str, float] | None = None  # for arms expanded from a sweep: swept parameter name -> value
    family: str | None = None  # the arm the sweep expanded from (same for every point of one sweep)
    gate: bool = False  # a sanity-check row, shown apart from the ranking


@dataclass(frozen=True)
class Gate:
    """A condition an arm's mean score must meet before a ranking means anything (``gates:`` in a recipe).

    For example: an SFT adapter trained on the base and transferred into the instruct model must keep the
    answer format; if even that fails, the family or the settings are broken, and no ranking is shown.
    """

    arm: str
    task: str
    metric: str
    minimum: float | None = None
    maximum: float | None = None
    why: str = ""
    value: float | None = None  # the arm's mean over seeds; None when it was not scored

    @property
    def passed(self) -> bool:
        if self.value is None or math.isnan(self.value):
            return False
        low_ok = self.minimum is None or self.value >= self.minimum
        return low_ok and (self.maximum is None or self.value <= self.maximum)

    def describe(self) -> str:
        bounds = " and ".join(
            text
            for text in (
                f"≥ {self.minimum:g}" if self.minimum is not None else "",
                f"≤ {self.maximum:g}" if self.maximum is not None else "",
            )
            if text
        )
        shown = "not scored" if self.value is None or math.isnan(self.value) else f"{self.value:.3f}"
        return f"{self.arm} {self.task} {self.metric} = {shown} (needs {bounds})"


@dataclass
class Comparison:
    """Everything a compare run produced; the tables, plots and the results.json cache are all built from it."""

    arms: list[ArmRecord]  # in recipe order
    scores: list[Score]
    tasks: list[str]  # in recipe order
    headline: dict[str, str]  # task -> the metric shown in the table and plots
    reference: str | None = None  # arm name deltas are taken against
    retention_task: str | None = None  # retained general ability: x axis of the Pareto plot
    target_task: str | None = None  # what the fine-tune targets: y axis of the Pareto plot
    samples: int = 1  # K of --samples; see metric_label
    meta: dict[str, object] = field(default_factory=dict)  # settings recorded in results.json; JSON values only
    gates: list[Gate] = field(default_factory=list)  # sanity conditions; a failed one withholds the ranking

    @property
    def failed_gates(self) -> list[Gate]:
        return [gate for gate in self.gates if not gate.passed]

    def validate(self) -> None:
        """Raise ValueError when the names do not fit together; the writers call this before writing anything."""
        names = [arm.name for arm in self.arms]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"arm names must be unique; repeated: {', '.join(duplicates)}")
        missing = [task for task in self.tasks if task not in self.headline]
        if missing:
            raise ValueError(f"no headline metric for task(s) {', '.join(missing)}")
        if self.reference is not None and self.reference not in names:
            raise ValueError(f"reference arm {self.reference!r} is not one of the arms ({', '.join(names)})")
        for role, task in (("retention_task", self.retention_task), ("target_task", self.target_task)):
            if task is not None and task not in self.tasks:
                raise ValueError(f"{role} {task!r} is not one of the tasks ({', '.join(self.tasks)})")
        unknown = sorted({s.arm for s in self.scores} - set(names))
        if unknown:
            raise ValueError(f"scores for arm(s) not in the comparison: {', '.join(unknown)}")

    def arm(self, name: str) -> ArmRecord:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(name)

    @property
    def ranked_arms(self) -> list[ArmRecord]:
        """The arms that compete (every arm but the sanity-check gates), in recipe order."""
        return [arm for arm in self.arms if not arm.gate]

    @property
    def gate_arms(self) -> list[ArmRecord]:
        return [arm for arm in self.arms if arm.gate]

    @property
    def seeds(self) -> list[int]:
        return sorted({s.seed for s in self.scores})

    def metrics(self, task: str) -> list[str]:
        """The metrics scored on a task: the headline first, then the others in the order first seen."""
        seen = [self.headline[task]] if task in self.headline else []
        for s in self.scores:
            if s.task == task and s.metric not in seen:
                seen.append(s.metric)
        return seen

    def values(self, arm: str, task: str, metric: str) -> list[float]:
        """The per-seed values of one cell, ordered by seed."""
        cell = sorted((s.seed, s.value) for s in self.scores if (s.arm, s.task, s.metric) == (arm, task, metric))
        return [value for _, value in cell]

    def summary(self, arm: str, task: str, metric: str) -> tuple[float, float, int]:
        """(mean, spread, n) over seeds: spread is the sample standard deviation (ddof=1), 0.0 for one seed.

        A cell with no scores is (nan, nan, 0), so a missing evaluation shows as missing, never as zero.
        """
        values = np.asarray(self.values(arm, task, metric), dtype=np.float64)
        n = int(values.size)
        if n == 0:
            return math.nan, math.nan, 0
        spread = float(np.std(values, ddof=1)) if n > 1 else 0.0
        return float(np.mean(values)), spread, n

    def headline_mean(self, arm: str, task: str) -> float:
        return self.summary(arm, task, self.headline[task])[0]

    def ranking(self) -> list[tuple[str, float]]:
        """Competing arms, best first, by the mean of their headline means over tasks; ties keep recipe order.

        An arm missing a task's score is ranked after every arm scored on all tasks (its mean covers fewer
        tasks, so it is not comparable); arms with no scores at all come last with a nan mean.
        """

        def key(item: tuple[int, str, float, int]) -> tuple[int, float, int]:
            index, _, mean, covered = item
            complete = 0 if covered == len(self.tasks) else 1 if covered else 2
            return complete, -mean if covered else 0.0, index

        rows = []
        for index, arm in enumerate(self.ranked_arms):
            means = [m for m in (self.headline_mean(arm.name, task) for task in self.tasks) if not math.isnan(m)]
            rows.append((index, arm.name, float(np.mean(means)) if means else math.nan, len(means)))
        return [(name, mean) for _, name, mean, _ in sorted(rows, key=key)]

    def to_json(self) -> dict[str, Any]:
        """Every field as plain JSON values; ``from_json(to_json())`` gives an equal Comparison."""
        return {
            "arms": [asdict(arm) for arm in self.arms],
            "scores": [asdict(score) for score in self.scores],
            "tasks": list(self.tasks),
            "headline": dict(self.headline),
            "reference": self.reference,
            "retention_task": self.retention_task,
            "target_task": self.target_task,
            "samples": self.samples,
            "meta": dict(self.meta),
            "gates": [asdict(gate) for gate in self.gates],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Comparison:
        return cls(
            arms=[ArmRecord(**arm) for arm in data["arms"]],
            scores=[Score(**score) for score in data["scores"]],
            tasks=list(data["tasks"]),
            headline=dict(data["headline"]),
            reference=data.get("reference"),
            retention_task=data.get("retention_task"),
            target_task=data.get("target_task"),
            samples=int(data.get("samples", 1)),
            meta=dict(data.get("meta", {})),
            gates=[Gate(**gate) for gate in data.get("gates", [])],
        )

    def dumps(self) -> str:
        """results.json's text: sorted keys and indent 2, so reruns with equal results give equal files."""
        return json.dumps(self.to_json(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> Comparison:
        """Reload a results.json written by :func:`gift_merge.compare.report.write_tables`."""
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
