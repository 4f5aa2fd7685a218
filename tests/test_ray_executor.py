"""`run --executor ray`: each stage's parts as Ray tasks on a local two-CPU instance, a single run's bytes;
a comparison's arms and seeds built and evaluated as Ray tasks, a local run's results."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from gift_merge.cli import main
from tests.test_parts import RANDOM, SHARDS, TWO_STAGES, _run, _same_folders


def test_ray_is_imported_only_for_the_ray_executor() -> None:
    code = "import sys, gift_merge.cli, gift_merge.parts, gift_merge.merge; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_without_ray_the_executor_says_how_to_get_it(
    tmp_path: Path, llama: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RANDOM.format(method="dare_ties", extra="", **llama))
    result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "o"), "--executor", "ray"])
    assert result.exit_code == 2 and "pip install 'gift-merge[ray]'" in result.output
    both = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "o"), "--executor", "ray", "--part", "0/2"])
    assert both.exit_code == 2 and "give one" in both.output


class _FakeTask:
    """A Ray task: the options it was given and the arguments of each submission (its ref: the index)."""

    def __init__(self) -> None:
        self.given: dict[str, object] = {}
        self.calls: list[tuple[object, ...]] = []

    def options(self, **options: object) -> _FakeTask:
        self.given = options
        return self

    def remote(self, *args: object) -> int:
        self.calls.append(args)
        return len(self.calls) - 1


class _FakeRay:
    """What the evaluations ask of Ray, recorded; every task finishes at once with the same record."""

    def __init__(self, gpus: int) -> None:
        self.gpus = gpus
        self.task = _FakeTask()

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": 16.0, **({"GPU": float(self.gpus)} if self.gpus else {})}

    def remote(self, function: object) -> _FakeTask:
        return self.task

    def wait(self, refs: list[int], num_returns: int, timeout: float) -> tuple[list[int], list[int]]:
        return refs[:1], refs[1:]

    def get(self, ref: int) -> dict[str, object]:
        return {"scores": {"gift_sni": {"rougeL": 0.5}}, "seconds": 1.0, "ref": ref}


@pytest.mark.parametrize(
    ("device", "cluster_gpus", "gpus", "device_in_task"),
    [
        ("cpu", 1, 0, "cpu"),
        ("auto", 0, 0, "auto"),
        ("auto", 2, 1, "auto"),
        ("cuda:1", 2, 1, "cuda"),
        ("cuda", 0, 1, "cuda"),
    ],
)
def test_each_evaluation_on_ray_asks_for_a_gpu_when_it_runs_on_one(
    device: str, cluster_gpus: int, gpus: int, device_in_task: str
) -> None:
    """Ray hands a task its GPU as cuda:0, whatever its number on the machine."""
    from types import SimpleNamespace

    from gift_merge.compare.run import EvalJob
    from gift_merge.evaluate.harness import EvalOptions
    from gift_merge.evaluate.loading import EvalTarget
    from gift_merge.merge import MergeOptions
    from gift_merge.ray_executor import MAX_RETRIES, evaluate_on_ray

    ray = _FakeRay(cluster_gpus)
    spec = SimpleNamespace(device=device, dtype="auto", tasks=("gift_sni",), headline={}, where="compare")
    jobs = [
        EvalJob(arm, seed, arm, EvalTarget(arm, Path(arm)), EvalOptions(tasks=("gift_sni",), seed=seed), "k", Path("c"))
        for arm, seed in (("a", 0), ("b", 0), ("b", 1))
    ]
    records = evaluate_on_ray(ray, MergeOptions(workers=3, quiet=True), jobs, spec)  # type: ignore[arg-type]
    assert {pair: record["ref"] for pair, record in records.items()} == {("a", 0): 0, ("b", 0): 1, ("b", 1): 2}
    assert ray.task.given == {
        "num_cpus": 3,
        "num_gpus": gpus,
        "max_retries": MAX_RETRIES,
        "retry_exceptions": [OSError],
    }
    assert ray.task.calls == [(job, device_in_task, "auto") for job in jobs]


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Two worker CPUs, a small object store; the first part 0 and the first evaluation any task runs die once
    (Ray runs them again)."""
    ray = pytest.importorskip("ray")
    from gift_merge.ray_executor import FAIL_ONCE_ENV

    marker = tmp_path_factory.mktemp("ray") / "crashed-once"
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 << 20, logging_level="ERROR",
             runtime_env={"env_vars": {FAIL_ONCE_ENV: str(marker)}})  # fmt: skip
    yield marker
    ray.shutdown()


@pytest.mark.slow  # starting Ray takes about 10 s on a two-core machine
def test_ray_writes_the_bytes_of_a_single_process_run(local_ray: Path, tmp_path: Path, llama: dict[str, Path]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RANDOM.format(method="dare_ties", extra="", **llama))
    _run(recipe, tmp_path / "whole", *SHARDS)
    said = _run(recipe, tmp_path / "ray", *SHARDS, "--executor", "ray", "--parts", "2", "--workers", "1")
    assert "merged model written to" in said
    assert local_ray.exists()  # a part's worker died once and Ray ran the part again
    _same_folders(tmp_path / "whole", tmp_path / "ray")
    assert not (tmp_path / "ray.parts").exists()


@pytest.mark.slow
def test_ray_runs_each_stage_then_the_next(local_ray: Path, tmp_path: Path, llama: dict[str, Path]) -> None:
    recipe = tmp_path / "two.yaml"
    recipe.write_text(TWO_STAGES.format(**llama))
    _run(recipe, tmp_path / "whole", *SHARDS)
    _run(recipe, tmp_path / "ray", *SHARDS, "--executor", "ray", "--workers", "1")  # a part per shard
    _same_folders(tmp_path / "whole-stages" / "soup", tmp_path / "ray-stages" / "soup")
    _same_folders(tmp_path / "whole", tmp_path / "ray", naming_paths=False)


@pytest.mark.slow
def test_a_comparison_on_ray_builds_and_evaluates_as_a_local_run(
    local_ray: Path, tmp_path: Path, llama: dict[str, Path]
) -> None:
    """Every build and evaluation a Ray task (an evaluation's worker dies once and Ray runs it again): the
    same stage bytes, evaluation files, scores, tables and plots as the local run."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("matplotlib")
    from gift_merge.compare.report import markdown
    from gift_merge.compare.results import Comparison
    from gift_merge.ray_executor import EVAL_MARKER_SUFFIX
    from tests.compare.test_compare_run import _recipe as compare_recipe

    recipe = compare_recipe(llama, tmp_path)  # ties, dare (2 seeds), a task-arithmetic sweep; 6 evaluations
    here, there = tmp_path / "here", tmp_path / "ray"
    for out, extra in ((here, []), (there, ["--executor", "ray"])):
        result = CliRunner().invoke(main, ["compare", str(recipe), str(out), "--workers", "1", *extra])
        assert result.exit_code == 0, result.output
    assert Path(f"{local_ray}{EVAL_MARKER_SUFFIX}").exists()  # an evaluation's worker died once
    built = sorted(p.relative_to(here) for p in here.rglob("*.safetensors"))
    assert len(built) >= 5 and any("seed-1" in str(p) for p in built)
    assert built == sorted(p.relative_to(there) for p in there.rglob("*.safetensors"))
    for path in built:
        assert (here / path).read_bytes() == (there / path).read_bytes(), path
        assert (there / path.parent / "gift-merge-build.json").is_file()
    evals = sorted(p.relative_to(here) for p in (here / "evals").rglob("*.json"))
    assert len(evals) == 6 and evals == sorted(p.relative_to(there) for p in (there / "evals").rglob("*.json"))
    for path in evals:  # the same answers (the toy models score 0 throughout), the same scores
        local_record, ray_record = (json.loads((out / path).read_text()) for out in (here, there))
        assert (local_record["samples"], local_record["scores"]) == (ray_record["samples"], ray_record["scores"]), path
    assert sorted(p.name for p in here.glob("*.png")) == sorted(p.name for p in there.glob("*.png"))

    def scores_only(out: Path) -> Comparison:  # times, memory and paths differ from run to run
        comparison = Comparison.load(out / "results.json")
        comparison.arms = [
            replace(a, build_seconds=None, peak_rss_bytes=None, eval_seconds=None) for a in comparison.arms
        ]
        comparison.meta = {}
        return comparison

    local, on_ray = scores_only(here), scores_only(there)
    assert on_ray.scores == local.scores  # in the same order
    assert markdown(on_ray) == markdown(local)
