"""The Pareto front of the arms: those no other arm beats on both axes (higher is better on both)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """``a`` is at least as good as ``b`` on both axes and better on one; equal points do not dominate each other."""
    return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the points no other point dominates; a point with a nan coordinate is never on it.

    Quadratic in the number of points, which is the number of arms (tens), so plain comparison is fast enough
    and obviously right.
    """
    valid = [i for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y))]
    return [i for i in valid if not any(dominates(points[j], points[i]) for j in valid if j != i)]
