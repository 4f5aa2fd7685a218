"""What a merge will cost, said before it runs: the probe, the replayed schedule, the plan and run lines.

How close the estimates come on real sizes is measured in benchmarks/RESULTS.md ("plan estimate vs
measured"); here: the arithmetic, and that every path reports and cleans up after itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from click.testing import CliRunner

from gift_merge.cli import main
from gift_merge.dtypes import BFLOAT16
from gift_merge.engine.compute import MethodEngine
from gift_merge.engine.executor import peak_in_flight, run_order, working_sets
from gift_merge.estimate import (
    UNBOUNDED,
    StageEstimate,
    describe_memory,
    format_seconds,
    held_by,
    peak_held,
    replay,
    resident_pages,
    substitutes_for,
    work,
)
from gift_merge.merge import MergeOptions, estimate, plan_recipe
from gift_merge.plan import MergePlan, TensorJob, TensorSource
from gift_merge.recipe import parse_recipe

LINEAR = "merge_method: linear\nmodels:\n  - {{model: {math}, parameters: {{weight: 1}}}}\n  - {{model: {code}, parameters: {{weight: 1}}}}\n"


def test_replay_follows_the_executors_admission_rule() -> None:
    assert replay([1.0, 1.0, 1.0], [1, 1, 1], workers=1, together=1.0) == pytest.approx(3.0)
    assert replay([1.0] * 4, [1] * 4, workers=2, together=2.0) == pytest.approx(2.0)  # two at a time, a core each
    assert replay([1.0] * 4, [1] * 4, workers=2, together=1.5) == pytest.approx(4 / 1.5)
    # a job past the memory budget runs alone: no overlap, whatever the workers could do
    assert replay([1.0, 1.0], [10, 10], workers=2, together=2.0, budget=15) == pytest.approx(2.0)
    # a long job and short ones: the short ones share the other worker while it runs
    assert replay([4.0, 1.0, 1.0], [1, 1, 1], workers=2, together=2.0) == pytest.approx(4.0)
    # a busy machine: one job gets half a core, two get one between them
    assert replay([1.0, 1.0], [1, 1], workers=1, together=0.5, alone=0.5) == pytest.approx(4.0)
    assert replay([1.0, 1.0], [1, 1], workers=2, together=1.0, alone=0.5) == pytest.approx(2.0)
    assert replay([], [], workers=2, together=2.0) == 0.0


def test_cores_used_are_cpu_over_wall_seconds_beyond_a_runs_set_up() -> None:
    from gift_merge.estimate import Run, _cores_used

    call = Run(wall=0.01, cpu=0.01)
    assert _cores_used([Run(1.01, 1.01)], call, 1) == pytest.approx(1.0)
    assert _cores_used([Run(2.01, 1.01)], call, 1) == pytest.approx(0.5)  # half the time, others had the core
    assert _cores_used([Run(1.01, 2.01)], call, 2) == pytest.approx(2.0)
    assert _cores_used([Run(1.01, 3.01)], call, 2) == 2.0  # never more than the workers


def test_peak_held_is_peak_in_flight_when_sizes_are_the_costs() -> None:
    costs = [5, 60, 60, 10, 150, 10]
    for workers in (1, 2, 4):
        assert peak_held(costs, costs, workers, budget=100) == peak_in_flight(costs, workers, budget=100)
    # admitted by their estimates, holding what was measured
    assert peak_held([1, 2, 3], [60, 60, 10], workers=4, budget=100) == 5  # the second waits for the first


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (0.04, 9.94, 42.0, 600.0, 7200.0)] == [
        "0.0 s",
        "9.9 s",
        "42 s",
        "10.0 min",
        "2.0 h",
    ]


def test_a_stage_is_probed_and_the_scratch_folder_is_left_empty(tmp_path: Path, llama: dict[str, Path]) -> None:
    plan = plan_recipe(parse_recipe(LINEAR.format(**llama), folder=tmp_path))[-1]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    found = estimate(plan, scratch / "out", MergeOptions(workers=2))
    assert isinstance(found, StageEstimate)
    assert found.kinds >= 1 and found.workers == 2 and 0 < found.cores_alone <= found.cores_together <= 2.0
    assert found.merge_s > 0 and found.seconds >= found.remaining_s > 0
    assert found.working_sets_measured and found.working_sets > 0  # numpy arrays, seen by tracemalloc
    assert found.probe_s < 10
    assert list(scratch.iterdir()) == []  # probe outputs are removed
    assert "measured on one tensor of each of" in found.describe()
    assert "(measured)" in describe_memory(0, found, 1)


def test_a_later_stage_is_timed_on_the_model_its_input_stage_starts_from(
    tmp_path: Path, llama: dict[str, Path]
) -> None:
    text = "name: soup\n" + LINEAR.format(**llama) + "---\n" + LINEAR.format(math="soup", code=llama["instruct"])
    plans = plan_recipe(parse_recipe(text, folder=tmp_path), tmp_path / "out")
    substitutes = substitutes_for(plans)
    assert substitutes["soup"].folder == llama["math"]  # no base: the first model is the reference
    assert isinstance(estimate(plans[-1], tmp_path / "out", MergeOptions(), substitutes), StageEstimate)
    assert isinstance(estimate(plans[-1], tmp_path / "out", MergeOptions()), str)  # soup is not built


def test_plan_states_time_memory_and_how_they_were_measured(tmp_path: Path, llama: dict[str, Path]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(LINEAR.format(**llama) + "output: out\n")
    result = CliRunner().invoke(main, ["plan", str(recipe)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("#")]
    assert any(line.startswith("# memory: about ") and "(measured)" in line for line in lines), lines
    assert any(line.startswith("# time: about ") and "the probe took" in line for line in lines), lines
    assert any(line.startswith("# time on this machine: about ") and "start-up and planning" in line for line in lines)


def test_run_states_the_estimate_when_a_stage_starts(
    tmp_path: Path, llama: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(LINEAR.format(**llama))
    with caplog.at_level(logging.INFO, logger="gift_merge"):
        result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert any("stage merge: about " in r.message and "private memory at the peak" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gift_merge"):
        result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "quiet"), "-q"])
    assert result.exit_code == 0 and not any("left" in r.message for r in caplog.records)  # --quiet: no probe


def test_page_cache_residency_is_read_without_reading(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * (1 << 20))  # just written: in the page cache
    pages = resident_pages(path)
    if pages is None:
        pytest.skip("mincore is not available here")
    assert len(pages) == (1 << 20) // 4096 and set(pages) <= {0, 1} and pages.count(1) > 0


def job(method: str, shape: tuple[int, ...], models: int = 3) -> TensorJob:
    inputs = tuple(TensorSource(f"m{i}", "w") for i in range(models))
    return TensorJob("w", method, inputs, TensorSource("base", "w"), ({},) * models, {}, shape, BFLOAT16)


def test_an_svd_merges_time_grows_with_the_smaller_dimension_too() -> None:
    """The probe of a 4096 × 4096 matrix is cut to its first 512 rows (2M entries): its SVD merge does 64
    times the probe's work, not the 8 times its entries say; a linear merge does 8 times."""
    probe, whole = (512, 4096), (4096, 4096)
    for method in ("tsv", "iso_c", "iso_cts"):
        assert work(job(method, whole)) / work(job(method, probe)) == 64
        assert work(job(method, (4096,))) == 4096  # not a matrix: the mean task vector, per entry
    assert work(job("linear", whole)) / work(job("linear", probe)) == 8


def test_an_svd_merges_working_set_counts_its_factors_and_workspace() -> None:
    """Beyond its inputs, whole in float32, an SVD merge holds the large factor and float64 (c, c) arrays;
    a wide matrix also the float64 right-hand side of its last product."""
    for shape in ((32000, 1024), (1024, 4416)):
        rows, cols = shape
        inputs = MethodEngine.working_set(job("linear", shape)) + rows * cols * 4 * 5  # base and 3 models whole
        held = MethodEngine.working_set(job("tsv", shape))
        assert held >= inputs + 4 * rows * cols + 48 * min(shape) ** 2
        assert (held >= inputs + 20 * rows * cols) == (rows < cols)


def test_the_executor_starts_the_jobs_with_the_most_work_first() -> None:
    """Largest work × inputs first, plan order among equals: an SVD merge of a square matrix outranks a
    linear merge of more entries, and a copied buffer ranks by its entries alone."""
    jobs = [
        job("linear", (64, 64)),
        job("linear", (4096, 64)),
        job("tsv", (512, 512)),
        job("linear", (64, 64)),
        job("linear", (128, 128), models=1),
    ]
    plan = cast(MergePlan, SimpleNamespace(jobs=jobs))
    order = run_order(plan)
    expected = sorted(range(len(jobs)), key=lambda i: (-work(jobs[i]) * len(jobs[i].inputs), i))
    assert order == expected == [2, 1, 4, 0, 3]


def test_a_job_the_budget_makes_stream_its_cuts_is_estimated_at_its_streamed_working_set(
    tmp_path: Path, llama: dict[str, Path]
) -> None:
    """The probe is small enough to buffer its cuts; scaled to a large tensor whose cuts stream, its buffers
    would overstate the peak (a 70B-vocabulary TIES merge was estimated at 9.7 GiB and held 0.14 GiB)."""
    recipe = (
        f"merge_method: ties\nbase_model: {llama['base']}\nmodels:\n"
        f"  - {{model: {llama['math']}, parameters: {{weight: 1, density: 0.5}}}}\n"
        f"  - {{model: {llama['code']}, parameters: {{weight: 1, density: 0.5}}}}\n"
    )
    plan = plan_recipe(parse_recipe(recipe, folder=tmp_path))[-1]
    budget = 1 << 16
    streamed_costs = working_sets(plan, "cpu", "auto", 1, budget)
    buffered_costs = working_sets(plan, "cpu", "auto", 1, UNBOUNDED)
    assert any(s < b for s, b in zip(streamed_costs, buffered_costs, strict=True))  # some jobs stream their cuts
    streamed = estimate(plan, tmp_path / "out", MergeOptions(workers=1, max_memory=budget))
    assert isinstance(streamed, StageEstimate) and streamed.working_sets_measured
    gib = 1 << 30  # a 1.05-billion-entry TIES tensor: buffers measured per entry, against its streamed slices
    assert held_by(10 * gib, gib // 10, 8 * gib) == gib // 10
    assert held_by(gib // 20, gib // 10, 8 * gib) == gib // 20  # the model's slices can exceed a small job's
    assert held_by(10 * gib, 8 * gib, 8 * gib) == 10 * gib  # buffered: as measured


def test_multislerp_and_karcher_hold_their_unit_vectors_in_the_model_while_they_fit() -> None:
    """Held arrays (one per model and one more, float32) count while they fit the job's limit; beyond it the
    job streams, and its working set is its slices."""
    big = job("karcher", (128256, 8192))
    slices = MethodEngine.working_set(job("linear", (128256, 8192)))
    assert MethodEngine.working_set(big, 1 << 30) == slices
    small = job("multislerp", (4096, 1024))
    held = 4 * 4096 * 1024 * 4  # three models and the mean direction
    assert MethodEngine.working_set(small, 1 << 30) == MethodEngine.working_set(job("linear", (4096, 1024))) + held
    assert MethodEngine.working_set(small, 1 << 20) == MethodEngine.working_set(job("linear", (4096, 1024)))


def test_plan_estimates_the_run_with_its_workers_and_memory_budget(tmp_path: Path, llama: dict[str, Path]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(LINEAR.format(**llama) + "output: out\n")
    result = CliRunner().invoke(main, ["plan", str(recipe), "--workers", "1", "--max-memory", "64MiB"])
    assert result.exit_code == 0, result.output
    assert ", 1 worker on " in result.output
    bad = CliRunner().invoke(main, ["plan", str(recipe), "--max-memory", "4x"])
    assert bad.exit_code == 2 and "--max-memory" in bad.output
