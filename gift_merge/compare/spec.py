"""A recipe's ``compare:`` document → arms to build and evaluate, and the extra stages that build them.

An arm is one model in the comparison. It is named in ``arms:`` as
- a string: the name of a document of the recipe (its output), or a model reference (a folder relative to
  the recipe, a Hub id, ``model+adapter``);
- a mapping with ``merge_method`` or ``train``: an inline document, built like any stage, optionally with
  ``sweep:`` (parameter → list of values) which expands into one arm per point of the grid.
``baselines:`` adds a ready-made set of arms (:mod:`gift_merge.compare.baselines`). Inline and preset
documents become ordinary stages of the recipe, so they are planned, validated and reused like the rest.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from gift_merge.compare.results import Gate
from gift_merge.errors import GiftMergeError
from gift_merge.evaluate.harness import EvalOptions
from gift_merge.recipe.loader import check_keys
from gift_merge.recipe.schema import ModelRef
from gift_merge.suggest import did_you_mean

DOCUMENT_KEYS = ("compare", "output")
SECTION_KEYS = (
    "arms", "baselines", "tasks", "seeds", "reference", "metrics", "target_task", "retention_task", "eval", "gates",
)  # fmt: skip
GATE_KEYS = ("arm", "task", "metric", "min", "max", "why")
EVAL_KEYS = (
    "limit", "batch_size", "num_fewshot", "samples", "temperature", "max_new_tokens", "chat_template",
    "system_prompt", "prompt_preset", "device", "dtype",
)  # fmt: skip
INLINE_KEYS = ("sweep", "gate")


@dataclass(frozen=True)
class ArmSpec:
    """One arm: built by ``stage`` (a stage name of the recipe), or the existing model ``model``."""

    name: str
    source: str
    stage: str | None = None
    model: ModelRef | None = None
    sweep: dict[str, float] | None = None
    family: str | None = None
    gate: bool = False


@dataclass(frozen=True)
class CompareSpec:
    arms: tuple[ArmSpec, ...]
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    evaluation: EvalOptions
    device: str = "cpu"
    dtype: str = "auto"
    reference: str | None = None
    headline: Mapping[str, str] = field(default_factory=dict)
    target_task: str | None = None
    retention_task: str | None = None
    output: str | None = None
    where: str = "compare"
    gates: tuple[Gate, ...] = ()

    def arm(self, name: str) -> ArmSpec:
        return next(a for a in self.arms if a.name == name)


@dataclass(frozen=True)
class ExtraDocument:
    """A stage document the compare section adds to the recipe (an inline arm, or a preset's)."""

    doc: dict[str, Any]
    where: str

    @property
    def text(self) -> str:
        return yaml.safe_dump(self.doc, sort_keys=False)


def is_compare_document(doc: Any) -> bool:
    return isinstance(doc, dict) and "compare" in doc


def parse_compare(doc: Mapping[str, Any], where: str, stage_names: set[str]) -> tuple[CompareSpec, list[ExtraDocument]]:
    """Validate the section; return its spec and the stage documents its inline and preset arms need."""
    check_keys(doc, DOCUMENT_KEYS, where)
    section = doc["compare"]
    where = f"{where}.compare"
    check_keys(section, SECTION_KEYS, where)
    extra: list[ExtraDocument] = []
    arms: list[ArmSpec] = []
    if section.get("baselines") is not None:
        from gift_merge.compare.baselines import expand_baselines

        preset_arms, preset_docs = expand_baselines(section["baselines"], f"{where}.baselines", stage_names)
        arms += preset_arms
        extra += preset_docs
    taken = stage_names | {d.doc["name"] for d in extra}
    raw_arms = section.get("arms") or {}
    if not isinstance(raw_arms, dict):
        raise GiftMergeError(f"{where}.arms: expected a mapping of arm names to a stage, a model or a document")
    for name, raw in raw_arms.items():
        new_arms, docs = _parse_arm(str(name), raw, f"{where}.arms.{name}", stage_names, taken)
        arms += new_arms
        extra += docs
        taken |= {d.doc["name"] for d in docs}
    if not arms:
        raise GiftMergeError(f"{where}: no arms; name some under 'arms:' or use 'baselines:'")
    names = [a.name for a in arms]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise GiftMergeError(f"{where}.arms: two arms are named {duplicate!r}")
    tasks = _string_list(section.get("tasks"), f"{where}.tasks")
    if not tasks:
        raise GiftMergeError(f"{where}.tasks: name at least one lm-eval task (gift-merge eval --list-tasks)")
    seeds = _int_list(section.get("seeds", [0]), f"{where}.seeds")
    reference = section.get("reference", arms[0].name if arms else None)
    if reference is not None and reference not in names:
        raise GiftMergeError(f"{where}.reference: no arm named {reference!r}{did_you_mean(str(reference), names)}")
    headline = section.get("metrics") or {}
    if not isinstance(headline, dict) or any(t not in tasks for t in headline):
        raise GiftMergeError(f"{where}.metrics: expected a mapping of task names (from 'tasks') to a metric")
    target = section.get("target_task", tasks[0])
    retention = section.get("retention_task", tasks[-1] if len(tasks) > 1 else None)
    for key, task in (("target_task", target), ("retention_task", retention)):
        if task is not None and task not in tasks:
            raise GiftMergeError(f"{where}.{key}: {task!r} is not one of the tasks")
    evaluation, device, dtype = _parse_eval(section.get("eval") or {}, f"{where}.eval", tasks)
    gates = _parse_gates(section.get("gates") or [], f"{where}.gates", names, tasks)
    spec = CompareSpec(
        arms=tuple(arms),
        tasks=tasks,
        seeds=seeds,
        evaluation=evaluation,
        device=device,
        dtype=dtype,
        reference=reference,
        headline={str(k): str(v) for k, v in headline.items()},
        target_task=target,
        retention_task=retention if retention != target else None,
        output=str(doc["output"]) if doc.get("output") is not None else None,
        where=where,
        gates=gates,
    )
    return spec, extra


def _parse_gates(raw: Any, where: str, arms: list[str], tasks: tuple[str, ...]) -> tuple[Gate, ...]:
    """``gates: [{arm, task, metric, min, max, why}]``: conditions the ranking depends on."""
    if not isinstance(raw, list):
        raise GiftMergeError(f"{where}: expected a list of {{arm, task, metric, min/max, why}}")
    gates = []
    for i, entry in enumerate(raw):
        at = f"{where}[{i}]"
        check_keys(entry, GATE_KEYS, at)
        if entry.get("arm") not in arms:
            raise GiftMergeError(
                f"{at}.arm: no arm named {entry.get('arm')!r}{did_you_mean(str(entry.get('arm')), arms)}"
            )
        if entry.get("task") not in tasks:
            raise GiftMergeError(f"{at}.task: {entry.get('task')!r} is not one of the tasks")
        bounds = {k: entry.get(k) for k in ("min", "max")}
        if all(v is None for v in bounds.values()) or not all(v is None or _is_number(v) for v in bounds.values()):
            raise GiftMergeError(f"{at}: give a number as 'min', 'max' or both")
        if not isinstance(entry.get("metric"), str):
            raise GiftMergeError(f"{at}.metric: expected a metric name the task reports (e.g. acc)")
        gates.append(
            Gate(
                arm=str(entry["arm"]),
                task=str(entry["task"]),
                metric=entry["metric"],
                minimum=float(bounds["min"]) if bounds["min"] is not None else None,
                maximum=float(bounds["max"]) if bounds["max"] is not None else None,
                why=str(entry.get("why", "")),
            )
        )
    return tuple(gates)


def _parse_arm(
    name: str, raw: Any, where: str, stage_names: set[str], taken: set[str]
) -> tuple[list[ArmSpec], list[ExtraDocument]]:
    if isinstance(raw, str):
        if raw in stage_names:
            return [ArmSpec(name, f"stage {raw}", stage=raw)], []
        return [ArmSpec(name, f"model {raw}", model=ModelRef.parse(raw, where))], []
    if not isinstance(raw, dict) or not ({"merge_method", "train"} & raw.keys()):
        raise GiftMergeError(f"{where}: expected a stage name, a model reference, or a merge_method/train document")
    doc = {k: v for k, v in raw.items() if k not in INLINE_KEYS}
    if "name" in doc or "output" in doc:
        raise GiftMergeError(f"{where}: an inline arm is named by its key; remove 'name'/'output'")
    gate = bool(raw.get("gate", False))
    kind = "train" if "train" in doc else str(doc["merge_method"])
    if raw.get("sweep") is None:
        stage = _stage_name(name, taken, where)
        return [ArmSpec(name, f"{kind} (inline)", stage=stage, gate=gate)], [
            ExtraDocument({"name": stage, **doc}, where)
        ]
    arms, docs = [], []
    for point in _grid(raw["sweep"], f"{where}.sweep"):
        label = ",".join(f"{_short(path)}={value:g}" for path, value in point.items())
        arm_name = f"{name}-{label}"
        point_doc = copy.deepcopy(doc)
        for path, value in point.items():
            set_parameter(point_doc, path, value, f"{where}.sweep.{path}")
        stage = _stage_name(arm_name, taken, where)
        taken = taken | {stage}
        sweep = {_short(path): value for path, value in point.items()}
        arms.append(ArmSpec(arm_name, f"{kind} (inline, {label})", stage=stage, sweep=sweep, family=name, gate=gate))
        docs.append(ExtraDocument({"name": stage, **point_doc}, where))
    return arms, docs


def _stage_name(arm: str, taken: set[str], where: str) -> str:
    if arm in taken:
        raise GiftMergeError(f"{where}: the arm name {arm!r} is also a document of the recipe; rename the arm")
    return arm


def _short(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _grid(raw: Any, where: str) -> list[dict[str, float]]:
    """``{weight: [0.5, 1], density: [0.3, 0.5]}`` → every combination, the first key varying slowest."""
    if not isinstance(raw, dict) or not raw:
        raise GiftMergeError(f"{where}: expected a mapping of parameter names to lists of values")
    axes = []
    for key, values in raw.items():
        if not isinstance(values, list) or not values or not all(_is_number(v) for v in values):
            raise GiftMergeError(f"{where}.{key}: expected a non-empty list of numbers")
        axes.append([(str(key), float(v)) for v in values])
    return [dict(point) for point in itertools.product(*axes)]


def set_parameter(doc: dict[str, Any], path: str, value: float, where: str) -> None:
    """Set one swept value in an arm's document.

    A plain name is a merge parameter set for the whole merge (``parameters.NAME``), or for a ``train:``
    arm a training option (``train.NAME``). A dotted path with list indices (``models[1].parameters.weight``)
    names the place exactly. A plain name that some model entry also sets is ambiguous, since a model's own
    value wins over the global one in mergekit's precedence: that is an error asking for the path.
    """
    if "." not in path and "[" not in path:
        if "train" in doc:
            doc["train"][path] = value
            return
        setters = [i for i, m in enumerate(doc.get("models") or []) if path in ((m or {}).get("parameters") or {})]
        if setters:
            raise GiftMergeError(
                f"{where}: models[{setters[0]}] sets its own {path!r}, which wins over a global value; "
                f"sweep 'models[{setters[0]}].parameters.{path}' instead"
            )
        doc.setdefault("parameters", {})[path] = value
        return
    node: Any = doc
    parts = path.replace("]", "").replace("[", ".").split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part.isdigit():
            index = int(part)
            if not isinstance(node, list) or index >= len(node):
                raise GiftMergeError(f"{where}: no list entry [{index}] at this place in the arm's document")
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise GiftMergeError(f"{where}: {part!r} does not name a mapping key in the arm's document")
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})


def _parse_eval(raw: Any, where: str, tasks: tuple[str, ...]) -> tuple[EvalOptions, str, str]:
    check_keys(raw, EVAL_KEYS, where)
    settings = {k: v for k, v in raw.items() if k not in ("device", "dtype")}
    try:
        options = EvalOptions(tasks=tasks, **settings)
    except TypeError as exc:
        raise GiftMergeError(f"{where}: {exc}") from None
    except GiftMergeError as exc:  # named by its CLI flag (--prompt-preset); here by its YAML key
        message = re.sub(r"^--([\w-]+)", lambda flag: flag.group(1).replace("-", "_"), str(exc))
        raise GiftMergeError(f"{where}: {message}") from None
    return options, str(raw.get("device", "cpu")), str(raw.get("dtype", "auto"))


def _string_list(raw: Any, where: str) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [t.strip() for t in raw.split(",") if t.strip()]
    if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
        raise GiftMergeError(f"{where}: expected a list of names")
    return tuple(raw)


def _int_list(raw: Any, where: str) -> tuple[int, ...]:
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(s, int) and not isinstance(s, bool) for s in raw):
        raise GiftMergeError(f"{where}: expected a non-empty list of integer seeds")
    if len(set(raw)) != len(raw):
        raise GiftMergeError(f"{where}: seeds repeat")
    return tuple(raw)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
