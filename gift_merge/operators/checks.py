"""Range checks for operator parameters, and the parameters several operators share.

A check returns a one-line message that names the parameter and the offending value, or ``None``. The
planner runs them on every resolved value (after gradients and filters) before any tensor is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .base import Param

Check = Callable[[Any], str | None]


def finite(name: str) -> Check:
    """Any finite real number."""

    def check(value: Any) -> str | None:
        return None if math.isfinite(value) else f"{name} must be a finite number, got {value}"

    return check


def interval(name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    """``value`` in the interval between ``low`` and ``high``; ``math.inf`` for an unbounded side."""
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    bounded = f"in {left}{low:g}, {high:g}{right}"
    text = (f"> {low:g}" if low_open else f"≥ {low:g}") if math.isinf(high) else bounded

    def check(value: Any) -> str | None:
        ok = math.isfinite(value) and (value > low if low_open else value >= low)
        ok = ok and (value < high if high_open else value <= high)
        return None if ok else f"{name} must be {text}, got {value}"

    return check


def fixed(name: str, value: Any, reason: str) -> Check:
    """Only the no-op ``value`` is accepted: a key mergekit declares but silently ignores."""

    def check(got: Any) -> str | None:
        return None if got == value else f"{name} must be {_yaml(value)} here ({reason}), got {_yaml(got)}"

    return check


def _yaml(value: Any) -> str:
    """A value as the recipe spells it (``false``, not ``False``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


WEIGHT = Param(
    "weight",
    per_model=True,
    doc="Scale of this model's contribution; may be negative.",
    check=finite("weight"),
)
DENSITY = Param(
    "density",
    1.0,
    per_model=True,
    doc="Fraction of this model's delta entries kept by pruning.",
    check=interval("density", 0.0, 1.0, low_open=True),
)
INT8_MASK = Param(
    "int8_mask",
    False,
    kind=bool,
    doc="Accepted for mergekit compatibility; only changes mergekit's mask storage, so no effect here.",
)
