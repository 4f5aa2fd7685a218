"""Parameter settings with mergekit's meaning: scalars, gradients over layers, filtered values.

A setting is compiled once when the recipe loads (so malformed ones fail with their YAML path) and
evaluated per output tensor by the planner, given the tensor's name and its relative depth ``t``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gift_merge.errors import GiftMergeError

Scalar = bool | int | float | str


@dataclass(frozen=True)
class Constant:
    value: Scalar

    def evaluate(self, tensor_name: str, t: float) -> Scalar | None:
        return self.value


@dataclass(frozen=True)
class Gradient:
    """Numbers spread evenly over t ∈ [0, 1], interpolated piecewise-linearly."""

    anchors: tuple[float, ...]

    def evaluate(self, tensor_name: str, t: float) -> Scalar | None:
        n = len(self.anchors)
        if n == 1:
            return self.anchors[0]
        x = min(max(t, 0.0), 1.0) * (n - 1)
        i = min(math.floor(x), n - 1)
        f = x - i
        return (1 - f) * self.anchors[i] + f * self.anchors[min(i + 1, n - 1)]


@dataclass(frozen=True)
class Steps:
    """Non-numeric values (bools, strings) over t: a step function, as mergekit does."""

    values: tuple[Scalar, ...]

    def evaluate(self, tensor_name: str, t: float) -> Scalar | None:
        n = len(self.values)
        return self.values[min(int(min(max(t, 0.0), 1.0) * (n - 1)), n - 1)]


@dataclass(frozen=True)
class Filtered:
    """``[{filter: mlp, value: …}, {value: …}]``: the first entry whose filter is a substring wins.

    No match evaluates to ``None`` so the lookup falls through to the next precedence level.
    """

    cases: tuple[tuple[str | None, Setting], ...]

    def evaluate(self, tensor_name: str, t: float) -> Scalar | None:
        for pattern, setting in self.cases:
            if pattern is None or pattern == "*" or pattern in tensor_name:
                return setting.evaluate(tensor_name, t)
        return None


Setting = Constant | Gradient | Steps | Filtered


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def compile_setting(raw: Any, where: str) -> Setting:
    """Build a setting from its YAML value; ``where`` is its YAML path for error messages."""
    if isinstance(raw, (bool, int, float, str)):
        return Constant(raw)
    if isinstance(raw, dict):
        return Filtered((_compile_case(raw, where),))
    if isinstance(raw, Sequence) and not isinstance(raw, str):
        items = list(raw)
        if not items:
            raise GiftMergeError(f"{where}: empty list")
        if all(isinstance(x, dict) for x in items):
            return Filtered(tuple(_compile_case(x, f"{where}[{i}]") for i, x in enumerate(items)))
        if all(_is_number(x) for x in items):
            return Gradient(tuple(float(x) for x in items))
        if all(isinstance(x, (bool, str)) for x in items):
            return Steps(tuple(items))
        raise GiftMergeError(
            f"{where}: a list must hold only numbers, only booleans/strings, or only {{filter, value}}"
        )
    raise GiftMergeError(f"{where}: expected a number, a list (gradient) or filtered values, got {type(raw).__name__}")


def _compile_case(raw: dict, where: str) -> tuple[str | None, Setting]:
    unknown = set(raw) - {"filter", "value"}
    if unknown:
        raise GiftMergeError(f"{where}: unknown key {sorted(unknown)[0]!r} (a filtered value has 'filter' and 'value')")
    if "value" not in raw:
        raise GiftMergeError(f"{where}: missing 'value'")
    pattern = raw.get("filter")
    if pattern is not None and not isinstance(pattern, str):
        raise GiftMergeError(f"{where}.filter: expected a string")
    value = raw["value"]
    if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(x, dict) for x in value)):
        raise GiftMergeError(f"{where}.value: filters cannot nest")
    return pattern, compile_setting(value, f"{where}.value")
