"""`run --executor ray`: each stage's parts as Ray tasks on a local two-CPU instance, a single run's bytes;
a comparison's arms and seeds built as Ray tasks."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Two worker CPUs, a small object store; the first part 0 any task runs dies once (Ray reruns it)."""
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
def test_ray_builds_every_arm_and_seed_of_a_comparison(local_ray: Path, tmp_path: Path, llama: dict[str, Path]) -> None:
    import ray

    from gift_merge.compare.run import _build_all, seeded_stages
    from gift_merge.merge import MergeOptions
    from gift_merge.ray_executor import build_compare_stages
    from gift_merge.recipe import load_recipe
    from tests.compare.test_compare_run import _recipe as compare_recipe

    recipe = load_recipe(compare_recipe(llama, tmp_path))  # ties, dare (2 seeds), a task-arithmetic sweep
    assert recipe.compare is not None
    options = MergeOptions(workers=1, quiet=True)
    _build_all(recipe, recipe.compare, tmp_path / "here", options, seeded_stages(recipe))
    build_compare_stages(ray, recipe, tmp_path / "ray", options)
    built = sorted(p.relative_to(tmp_path / "here") for p in (tmp_path / "here").rglob("*.safetensors"))
    assert len(built) >= 5 and any("seed-1" in str(p) for p in built)
    assert built == sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*.safetensors"))
    for path in built:
        assert (tmp_path / "here" / path).read_bytes() == (tmp_path / "ray" / path).read_bytes(), path
        assert (tmp_path / "ray" / path.parent / "gift-merge-build.json").is_file()
