"""The comparison as figures: scores per task, target against retention (Pareto), and each sweep's curve.

matplotlib is imported inside the functions, with the Agg backend, so the package imports without it and
plots render with no display (CI, SSH). Scores are plotted ×100 like the tables. Every figure has a fixed
size in inches at :data:`DPI`, laid out by matplotlib's constrained layout with legends outside the axes,
so each PNG is exactly ``size × DPI`` pixels (about 1100–1200 wide) and its text stays readable at 1000 px.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gift_merge.compare.pareto import pareto_front
from gift_merge.compare.results import ArmRecord, Comparison, metric_label
from gift_merge.errors import GiftMergeError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "DPI",
    "SIZES",
    "arm_colors",
    "pareto_front",
    "plot_pareto",
    "plot_scores",
    "plot_sweep",
    "sweep_families",
    "write_plots",
]

DPI = 120
SIZES: dict[str, tuple[float, float]] = {"scores": (10.0, 5.6), "pareto": (9.6, 7.2), "sweep": (10.0, 5.2)}
LOG_X_RATIO = 50.0  # a sweep whose positive values span this factor or more gets a log x axis


def write_plots(comparison: Comparison, folder: str | Path) -> list[Path]:
    """Write scores.png, pareto.png (when retention and target tasks are set) and sweep-<family>.png per sweep.

    A figure that has nothing to show (no scores, fewer than two swept values) is not written; the paths
    returned are the files written, in that order.
    """
    comparison.validate()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots: list[tuple[str, Callable[[], Figure | None]]] = [("scores.png", lambda: plot_scores(comparison))]
    if comparison.retention_task is not None and comparison.target_task is not None:
        plots.append(("pareto.png", lambda: plot_pareto(comparison)))
    for family, arms in sweep_families(comparison).items():
        plots.append((f"sweep-{_file_safe(family)}.png", partial(plot_sweep, comparison, family, arms)))
    written = []
    for name, plot in plots:
        figure = plot()
        if figure is None:
            continue
        try:
            figure.savefig(folder / name, dpi=DPI)
        finally:
            _close(figure)  # pyplot keeps every open figure alive until it is closed
        written.append(folder / name)
    return written


def sweep_families(comparison: Comparison) -> dict[str, list[ArmRecord]]:
    """Competing arms expanded from a sweep, grouped by the arm they came from, in recipe order."""
    families: dict[str, list[ArmRecord]] = {}
    for arm in comparison.ranked_arms:
        if arm.family is not None and arm.sweep:
            families.setdefault(arm.family, []).append(arm)
    return families


# --- shared ------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise GiftMergeError("the comparison plots need matplotlib: pip install matplotlib") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(kind: str, **subplots: Any) -> tuple[Figure, Any]:
    plt = _pyplot()
    return plt.subplots(figsize=SIZES[kind], dpi=DPI, layout="constrained", **subplots)


def _close(figure: Figure) -> None:
    _pyplot().close(figure)


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "sweep"


def _shade(color: Sequence[float], amount: float) -> tuple[float, float, float]:
    """``color`` mixed towards white (amount < 0) or black (amount > 0) by |amount|."""
    target = 1.0 if amount < 0 else 0.0
    return tuple(c + (target - c) * abs(amount) for c in color[:3])  # type: ignore[return-value]


def arm_colors(comparison: Comparison) -> dict[str, tuple[float, float, float]]:
    """One colour per competing arm, the same in every figure; a sweep's points share a hue, light to dark."""
    import matplotlib

    groups: list[list[str]] = []
    family_group: dict[str, int] = {}
    for arm in comparison.ranked_arms:
        if arm.family is not None and arm.sweep:
            if arm.family not in family_group:
                family_group[arm.family] = len(groups)
                groups.append([])
            groups[family_group[arm.family]].append(arm.name)
        else:
            groups.append([arm.name])
    palette = matplotlib.colormaps["tab10" if len(groups) <= 10 else "tab20"]
    colors = {}
    for g, names in enumerate(groups):
        base = palette(g % palette.N)
        for k, name in enumerate(names):
            amount = 0.0 if len(names) == 1 else -0.45 + 0.8 * k / (len(names) - 1)
            colors[name] = _shade(base, amount)
    return colors


def _seed_note(comparison: Comparison) -> str:
    n = len(comparison.seeds)
    return f"mean ± sd over {n} seeds" if n > 1 else "one seed"


def _task_axis_label(comparison: Comparison, task: str, role: str) -> str:
    label = metric_label(comparison.headline[task], comparison.samples)
    return f"{task} {label} (×100) — {role}"


# --- scores.png --------------------------------------------------------------------------------------------


def plot_scores(comparison: Comparison) -> Figure | None:
    """Grouped bars: one group per task, one bar per competing arm (headline mean ± sd), seed values as dots."""
    arms = comparison.ranked_arms
    if not arms or not comparison.scores or not comparison.tasks:
        return None
    figure, ax = _figure("scores")
    colors = arm_colors(comparison)
    n = len(arms)
    width = 0.84 / n
    top = 0.0
    for a, arm in enumerate(arms):
        offset = (a - (n - 1) / 2) * width
        for t, task in enumerate(comparison.tasks):
            metric = comparison.headline[task]
            mean, spread, count = comparison.summary(arm.name, task, metric)
            if count == 0:
                continue
            x = t + offset
            is_reference = arm.name == comparison.reference
            ax.bar(
                x,
                100 * mean,
                width=width * 0.92,
                color=colors[arm.name],
                edgecolor="black" if is_reference else "none",
                linewidth=1.2 if is_reference else 0,
                hatch="///" if is_reference else None,
                label=(f"{arm.name} (reference)" if is_reference else arm.name) if t == 0 else None,
                zorder=2,
            )
            if count > 1:
                ax.errorbar(
                    x, 100 * mean, yerr=100 * spread, fmt="none", ecolor="black", elinewidth=1, capsize=2, zorder=3
                )
            values = comparison.values(arm.name, task, metric)
            jitter = [width * 0.18 * (k - (len(values) - 1) / 2) / max(len(values) - 1, 1) for k in range(len(values))]
            ax.scatter(
                [x + j for j in jitter],
                [100 * v for v in values],
                s=9,
                facecolor="white",
                edgecolor="black",
                linewidth=0.6,
                zorder=4,
            )
            top = max(top, 100 * (mean + spread), *(100 * v for v in values))
    labels = [metric_label(comparison.headline[t], comparison.samples) for t in comparison.tasks]
    ticks = []
    for task, label in zip(comparison.tasks, labels, strict=True):
        role = {comparison.target_task: " · target", comparison.retention_task: " · retention"}.get(task, "")
        ticks.append(f"{task}\n{label}{role}")
    ax.set_xticks(range(len(comparison.tasks)), ticks)
    ax.set_xlim(-0.5, len(comparison.tasks) - 0.5)
    ax.set_ylim(0, min(100.0, math.ceil(top * 1.08 / 10) * 10) or 100.0)
    ax.set_ylabel(f"{labels[0]} (×100)" if len(set(labels)) == 1 else "headline score (×100)")
    ax.set_title(f"Headline score per task ({_seed_note(comparison)}; dots: single seeds)")
    ax.grid(axis="y", color="0.88", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    figure.legend(loc="outside lower center", ncols=min(n, 4), frameon=False, fontsize=9)
    return figure


# --- pareto.png --------------------------------------------------------------------------------------------

# where a point's name may go, tried in order until one covers nothing: the eight directions (diagonals first,
# as they clear both error bars) at each distance in points beyond the marker's edge
_LABEL_DIRECTIONS = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
_LABEL_RINGS = (1.0, 14.0, 30.0)  # beyond the first, a thin line leads from the name to its point
# what a name may cover, worst first: another name, a marker, an error bar
_COVER_WEIGHTS = {"label": 5.0, "marker": 2.0, "bar": 0.5}


def plot_pareto(comparison: Comparison) -> Figure | None:
    """Each competing arm at (retention, target) with sd error bars; the non-dominated arms joined as the front."""
    retention, target = comparison.retention_task, comparison.target_task
    if retention is None or target is None:
        return None
    arms, points, errors = [], [], []
    for arm in comparison.ranked_arms:
        x, sx, nx = comparison.summary(arm.name, retention, comparison.headline[retention])
        y, sy, ny = comparison.summary(arm.name, target, comparison.headline[target])
        if nx and ny:
            arms.append(arm)
            points.append((100 * x, 100 * y))
            errors.append((100 * sx, 100 * sy))
    if not arms:
        return None
    figure, ax = _figure("pareto")
    colors = arm_colors(comparison)
    front = pareto_front(points)

    reference = next((i for i, arm in enumerate(arms) if arm.name == comparison.reference), None)
    if reference is not None:  # arms up and to the right of these lines beat the reference on both tasks
        rx, ry = points[reference]
        ax.axvline(rx, color="0.6", linestyle=":", linewidth=1, zorder=1)
        ax.axhline(ry, color="0.6", linestyle=":", linewidth=1, zorder=1)

    ordered = sorted(front, key=lambda i: (points[i][0], -points[i][1]))
    ax.plot(
        [points[i][0] for i in ordered],
        [points[i][1] for i in ordered],
        color="0.25",
        linestyle="--",
        linewidth=1.2,
        zorder=2,
        label="Pareto front",
        marker="o",
        markersize=15,
        markerfacecolor="none",
        markeredgecolor="0.25",
    )
    for i, arm in enumerate(arms):
        (x, y), (sx, sy) = points[i], errors[i]
        is_reference = i == reference
        ax.errorbar(
            x,
            y,
            xerr=sx,
            yerr=sy,
            fmt="*" if is_reference else "o",
            markersize=15 if is_reference else 7,
            color=colors[arm.name],
            markeredgecolor="black",
            markeredgewidth=0.8 if is_reference else 0.5,
            elinewidth=1,
            capsize=2,
            zorder=3,
            label=f"reference: {arm.name}" if is_reference else None,
        )
    _pad_limits(ax, points, errors)
    ax.set_xlabel(_task_axis_label(comparison, retention, "retention"))
    ax.set_ylabel(_task_axis_label(comparison, target, "target"))
    ax.set_title(f"Target against retained ability ({_seed_note(comparison)}; up and right is better)")
    ax.grid(color="0.92", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    figure.legend(loc="outside lower center", ncols=2, frameon=False, fontsize=9)
    sizes = [15.0 if i in front or i == reference else 7.0 for i in range(len(arms))]
    _place_labels(figure, ax, [arm.name for arm in arms], points, errors, sizes)
    return figure


def _pad_limits(ax: Axes, points: list[tuple[float, float]], errors: list[tuple[float, float]]) -> None:
    """Limits around the points and their error bars, with room at the edges for the name labels."""
    for axis, set_limits in ((0, ax.set_xlim), (1, ax.set_ylim)):
        low = min(p[axis] - e[axis] for p, e in zip(points, errors, strict=True))
        high = max(p[axis] + e[axis] for p, e in zip(points, errors, strict=True))
        pad = max((high - low) * (0.14 if axis == 0 else 0.08), 1.0)
        set_limits(low - pad, high + pad)


def _place_labels(
    figure: Figure,
    ax: Axes,
    names: list[str],
    points: list[tuple[float, float]],
    errors: list[tuple[float, float]],
    sizes: list[float],
) -> None:
    """Name each point, trying a few offsets per label and keeping the first that covers no other label, marker
    or error bar and stays inside the axes (else the least covering one): cheap, and enough for tens of arms.

    ``sizes`` are the markers' diameters in points.
    """
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    figure.canvas.draw()  # fixes the layout, so display coordinates below are final
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    inside = ax.get_window_extent(renderer)
    pixels_per_point = DPI / 72
    taken: list[tuple[Bbox, float]] = []
    for (x, y), (sx, sy), size in zip(points, errors, sizes, strict=True):
        (px, py), (left, bottom), (right, top) = ax.transData.transform([(x, y), (x - sx, y - sy), (x + sx, y + sy)])
        r = (size / 2 + 1) * pixels_per_point
        taken.append((Bbox.from_extents(px - r, py - r, px + r, py + r), _COVER_WEIGHTS["marker"]))
        taken.append((Bbox.from_extents(left, py - 2, right, py + 2), _COVER_WEIGHTS["bar"]))
        taken.append((Bbox.from_extents(px - 2, bottom, px + 2, top), _COVER_WEIGHTS["bar"]))

    def cost(box: Bbox) -> float:
        covered = sum(weight * _area(Bbox.intersection(box, other)) for other, weight in taken)
        outside = box.width * box.height - _area(Bbox.intersection(box, inside))
        return covered + 10 * outside

    order = sorted(range(len(points)), key=lambda i: -points[i][1])  # top down, so upper labels settle first
    for i in order:
        best: tuple[float, Any, Bbox] | None = None
        reach = sizes[i] / 2 + 1  # offsets start at the marker's edge
        for ring, (dx, dy) in itertools.product(_LABEL_RINGS, _LABEL_DIRECTIONS):
            distance = reach + ring + (3 if dy == 0 else 0)  # a name level with its point needs a little more room
            text = ax.annotate(
                names[i],
                points[i],
                xytext=(dx * distance, dy * distance),
                textcoords="offset points",
                ha={1: "left", -1: "right", 0: "center"}[dx],
                va={1: "bottom", -1: "top", 0: "center"}[dy],
                fontsize=9,
                zorder=5,
                arrowprops=None
                if ring == _LABEL_RINGS[0]
                else {"arrowstyle": "-", "color": "0.5", "linewidth": 0.6, "shrinkA": 1, "shrinkB": reach},
            )
            text.update_positions(renderer)  # places the name at its offset, as a draw would
            box = Text.get_window_extent(text, renderer).padded(1)  # the name alone, without its leader line
            score = cost(box)
            if best is None or score < best[0]:
                if best is not None:
                    best[1].remove()
                best = (score, text, box)
            else:
                text.remove()
            if score == 0:
                break
        assert best is not None
        taken.append((best[2], _COVER_WEIGHTS["label"]))


def _area(box: Any) -> float:
    return 0.0 if box is None else box.width * box.height


# --- sweep-<family>.png ------------------------------------------------------------------------------------


def plot_sweep(comparison: Comparison, family: str, arms: list[ArmRecord]) -> Figure | None:
    """Headline scores against the swept value: one line per task; with a second swept parameter, one panel per
    task and one line per value of the other parameter(s). None when fewer than two values were swept."""
    params: list[str] = []
    for arm in arms:
        params += [p for p in arm.sweep or {} if p not in params]
    varied = [p for p in params if len({(arm.sweep or {}).get(p) for arm in arms}) > 1]
    if not varied:
        return None
    x_param, others = varied[0], varied[1:]
    if not others:
        figure, ax = _figure("sweep")
        _sweep_by_task(comparison, ax, arms, x_param)
        axes = [ax]
    else:
        figure, axes = _figure("sweep", ncols=len(comparison.tasks), squeeze=False)
        axes = list(axes[0])
        for ax, task in zip(axes, comparison.tasks, strict=True):
            _sweep_one_task(comparison, ax, arms, task, x_param, others)
    xs = sorted({float((arm.sweep or {})[x_param]) for arm in arms if x_param in (arm.sweep or {})})
    for ax in axes:
        if xs[0] > 0 and xs[-1] / xs[0] >= LOG_X_RATIO:
            ax.set_xscale("log")
        if len(xs) <= 10:
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.minorticks_off()
        ax.set_xlabel(x_param)
        ax.grid(color="0.92", linewidth=0.8)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_ylabel("headline score (×100)")
    figure.suptitle(f"Sweep of {family}: headline score against {x_param} ({_seed_note(comparison)})")
    handles, labels = axes[0].get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: "(reference)" in labels[i])  # the curves first
    figure.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        loc="outside lower center",
        ncols=4,
        frameon=False,
        fontsize=9,
    )
    return figure


def _curve(comparison: Comparison, arms: list[ArmRecord], task: str, x_param: str) -> tuple[list[float], ...]:
    rows = []
    for arm in arms:
        mean, spread, n = comparison.summary(arm.name, task, comparison.headline[task])
        if n and x_param in (arm.sweep or {}):
            rows.append((float((arm.sweep or {})[x_param]), 100 * mean, 100 * spread))
    rows.sort()
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def _reference_line(comparison: Comparison, ax: Axes, task: str, color: Any, label: str | None) -> None:
    if comparison.reference is None:
        return
    mean = comparison.headline_mean(comparison.reference, task)
    if not math.isnan(mean):
        ax.axhline(100 * mean, color=color, linestyle=":", linewidth=1.2, label=label, zorder=1)


def _sweep_by_task(comparison: Comparison, ax: Axes, arms: list[ArmRecord], x_param: str) -> None:
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    for t, task in enumerate(comparison.tasks):
        xs, ys, es = _curve(comparison, arms, task, x_param)
        if not xs:
            continue
        color = palette(t % palette.N)
        label = f"{task} ({metric_label(comparison.headline[task], comparison.samples)})"
        ax.errorbar(xs, ys, yerr=es, color=color, marker="o", markersize=5, capsize=3, linewidth=1.6, label=label)
        _reference_line(comparison, ax, task, color, None)
    if comparison.reference is not None:  # one legend entry stands for the dotted line in each task's colour
        label = f"{comparison.reference} (reference), dotted in each task's colour"
        ax.plot([], [], color="0.4", linestyle=":", linewidth=1.2, label=label)


def _sweep_one_task(
    comparison: Comparison, ax: Axes, arms: list[ArmRecord], task: str, x_param: str, others: list[str]
) -> None:
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    groups: dict[tuple[Any, ...], list[ArmRecord]] = {}
    for arm in arms:
        groups.setdefault(tuple((arm.sweep or {}).get(p) for p in others), []).append(arm)
    first = task == comparison.tasks[0]  # legend entries come from the first panel only
    for g, (key, members) in enumerate(sorted(groups.items(), key=lambda item: tuple(map(_sortable, item[0])))):
        xs, ys, es = _curve(comparison, members, task, x_param)
        if not xs:
            continue
        label = ", ".join(
            f"{p}={v:g}" if isinstance(v, (int, float)) else f"{p}={v}" for p, v in zip(others, key, strict=True)
        )
        ax.errorbar(
            xs,
            ys,
            yerr=es,
            color=palette(g % palette.N),
            marker="o",
            markersize=5,
            capsize=3,
            linewidth=1.6,
            label=label if first else None,
        )
    _reference_line(comparison, ax, task, "0.4", f"{comparison.reference} (reference)" if first else None)
    ax.set_title(f"{task} ({metric_label(comparison.headline[task], comparison.samples)})", fontsize=10)


def _sortable(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))
