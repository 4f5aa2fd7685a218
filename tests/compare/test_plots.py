"""plots.py and pareto.py: the front against brute force, and PNGs that are real, sized, and only when apt."""

from __future__ import annotations

import itertools
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gift_merge.compare.pareto import pareto_front
from gift_merge.compare.plots import DPI, SIZES, plot_pareto, plot_scores, write_plots
from gift_merge.compare.results import Comparison
from tests.compare.conftest import realistic_comparison, two_parameter_sweep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def plt():
    """pyplot on the Agg backend; the plot tests skip where matplotlib (an optional dependency) is missing."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def _name_boxes(figure) -> list:
    """Each point name's box in pixels: the text alone, without its leader line."""
    from matplotlib.text import Text

    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    return [(text.get_text(), Text.get_window_extent(text, renderer)) for text in figure.axes[0].texts]


def _brute_front(points: list[tuple[float, float]]) -> list[int]:
    front = []
    for i, (x, y) in enumerate(points):
        if math.isnan(x) or math.isnan(y):
            continue
        beaten = any(
            ox >= x and oy >= y and (ox, oy) != (x, y)
            for j, (ox, oy) in enumerate(points)
            if j != i and not (math.isnan(ox) or math.isnan(oy))
        )
        if not beaten:
            front.append(i)
    return front


def test_pareto_front_matches_brute_force() -> None:
    rng = np.random.default_rng(11)
    for trial in range(200):
        n = int(rng.integers(1, 14))
        coords = rng.integers(0, 5, size=(n, 2)).astype(float)  # small integers: many ties and equal points
        points = [(float(x), float(y)) for x, y in coords]
        if trial % 5 == 0:
            points[0] = (math.nan, 3.0)
        assert pareto_front(points) == _brute_front(points)


def test_pareto_front_keeps_equal_points() -> None:
    assert pareto_front([(1.0, 1.0), (1.0, 1.0), (0.5, 0.5)]) == [0, 1]
    assert pareto_front([(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.4, 0.4)]) == [0, 1, 2]
    assert pareto_front([]) == []


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _expected(kind: str) -> tuple[int, int]:
    width, height = SIZES[kind]
    return round(width * DPI), round(height * DPI)


@pytest.fixture(scope="module")
def realistic_plots(plt, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_plots(realistic_comparison(), tmp_path_factory.mktemp("plots"))


def test_plots_are_sized_pngs(realistic_plots: list[Path]) -> None:
    import matplotlib.image

    assert [p.name for p in realistic_plots] == ["scores.png", "pareto.png", "sweep-task_arithmetic.png"]
    for path, kind in zip(realistic_plots, ("scores", "pareto", "sweep"), strict=True):
        width, height = _expected(kind)
        assert _png_size(path) == (width, height)
        image = matplotlib.image.imread(path)
        assert image.shape[:2] == (height, width)
        assert float(image[..., :3].std()) > 0.05  # something was drawn, not a blank canvas


def test_no_pareto_or_sweep_when_not_applicable(plt, tmp_path: Path) -> None:
    comparison = realistic_comparison()
    comparison.retention_task = None
    for arm in comparison.arms:
        arm.sweep, arm.family = None, None
    written = write_plots(comparison, tmp_path)
    assert [p.name for p in written] == ["scores.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.png"]


def test_two_parameter_sweep_and_no_pareto_tasks(plt, tmp_path: Path) -> None:
    written = write_plots(two_parameter_sweep(), tmp_path)
    assert [p.name for p in written] == ["scores.png", "sweep-dare_ties.png"]
    assert _png_size(written[1]) == _expected("sweep")


def test_scores_plot_draws_one_bar_per_competing_arm_and_task(plt) -> None:
    comparison = realistic_comparison()
    figure = plot_scores(comparison)
    assert figure is not None
    try:
        bars = [p for p in figure.axes[0].patches if p.get_height() > 0]
        assert len(bars) == len(comparison.ranked_arms) * len(comparison.tasks)  # the gate is not plotted
        assert figure.axes[0].get_ylabel() == "headline score (×100)"
        assert figure.axes[0].get_ylim()[1] <= 100
    finally:
        plt.close(figure)


def test_pareto_labels_do_not_overlap(plt, realistic: Comparison) -> None:
    figure = plot_pareto(realistic)
    assert figure is not None
    try:
        boxes = dict(_name_boxes(figure))
        assert set(boxes) == {arm.name for arm in realistic.ranked_arms}
        for (a, box_a), (b, box_b) in itertools.combinations(boxes.items(), 2):
            assert not box_a.overlaps(box_b), (a, b)
        inside = figure.axes[0].get_window_extent(figure.canvas.get_renderer())
        assert all(inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1) for box in boxes.values())
    finally:
        plt.close(figure)


def test_package_imports_without_matplotlib() -> None:
    code = "import sys, gift_merge.compare.plots, gift_merge.compare.report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pareto_labels_spread_out_in_a_crowd(plt) -> None:
    """Six arms within a point of each other: the first-choice offset would stack their names."""
    from gift_merge.compare.results import ArmRecord, Score

    spots = {"instruct": (0.40, 0.30), "far": (0.20, 0.50)}
    spots |= {f"crowd-{k}": (0.30 + 0.002 * k, 0.40 + 0.002 * (k % 3)) for k in range(6)}
    scores = [
        Score(arm, task, "acc", seed, value + 0.005 * seed)
        for arm, xy in spots.items()
        for task, value in zip(("r", "t"), xy, strict=True)
        for seed in (0, 1)
    ]
    comparison = Comparison(
        [ArmRecord(arm, "x") for arm in spots],
        scores,
        ["r", "t"],
        {"r": "acc", "t": "acc"},
        reference="instruct",
        retention_task="r",
        target_task="t",
    )
    figure = plot_pareto(comparison)
    assert figure is not None
    try:
        boxes = [box for _, box in _name_boxes(figure)]
        assert len(boxes) == len(spots)
        assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    finally:
        plt.close(figure)
