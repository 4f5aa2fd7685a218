"""``gift-merge compare`` end to end on tiny models: arms built, evaluated per seed, tabulated, reused."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("lm_eval")
pytest.importorskip("matplotlib")

from gift_merge.cli import main

TASKS = ["gift_mmlu_stem", "gift_sni"]


def _recipe(llama: dict[str, Path], folder: Path) -> Path:
    def pair(method: str, extra: str = "") -> str:
        return (
            f"      merge_method: {method}\n      base_model: {llama['base']}\n      models:\n"
            f"        - model: {llama['instruct']}\n          parameters: {{weight: 1.0{extra}}}\n"
            f"        - model: {llama['math']}\n          parameters: {{weight: 1.0{extra}}}\n"
        )

    text = (
        "compare:\n"
        f"  tasks: [{', '.join(TASKS)}]\n"
        "  seeds: [0, 1]\n"
        "  reference: instruct\n"
        "  eval: {limit: 3, max_new_tokens: 6, batch_size: 4}\n"
        "  arms:\n"
        f"    instruct: {llama['instruct']}\n"
        f"    ties:\n{pair('ties', ', density: 0.5')}"
        f"    dare:\n{pair('dare_ties', ', density: 0.5')}"
        "    ta:\n"
        f"      merge_method: task_arithmetic\n      base_model: {llama['base']}\n      models:\n"
        f"        - model: {llama['instruct']}\n        - model: {llama['math']}\n"
        "      sweep: {weight: [0.5, 1.5]}\n"
        "output: results\n"
    )
    recipe = folder / "compare.yaml"
    recipe.write_text(text)
    return recipe


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def compared(llama: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("compare")
    recipe = _recipe(llama, folder)
    result = CliRunner().invoke(main, ["compare", str(recipe)])
    assert result.exit_code == 0, result.output
    return recipe, result.output


def test_one_recipe_builds_evaluates_and_ranks_every_arm(compared: tuple[Path, str]) -> None:
    recipe, output = compared
    out = recipe.parent / "results"
    arms = ["instruct", "ties", "dare", "ta-weight=0.5", "ta-weight=1.5"]
    table = (out / "results.md").read_text()
    for arm in arms:
        assert f"| {arm}" in table and arm in output  # the table is also printed
    assert {p.name for p in out.glob("*.png")} >= {"scores.png", "pareto.png", "sweep-ta.png"}
    # random stages are built per seed, deterministic ones once
    assert (out / "stages" / "seed-0" / "dare" / "config.json").is_file()
    assert (out / "stages" / "seed-1" / "dare" / "config.json").is_file()
    assert (out / "stages" / "ties" / "config.json").is_file()
    assert not (out / "stages" / "seed-0" / "ties").exists()
    seed0 = sorted((out / "stages" / "seed-0" / "dare").glob("*.safetensors"))
    seed1 = sorted((out / "stages" / "seed-1" / "dare").glob("*.safetensors"))
    assert [p.read_bytes() for p in seed0] != [p.read_bytes() for p in seed1]
    # greedy evaluation of an arm that no seed changes runs once; a seeded arm once per seed
    assert sorted(p.name for p in (out / "evals" / "ties").iterdir()) == ["seed-0.json"]
    assert sorted(p.name for p in (out / "evals" / "dare").iterdir()) == ["seed-0.json", "seed-1.json"]


def test_results_carry_the_evaluations(compared: tuple[Path, str]) -> None:
    recipe, _ = compared
    out = recipe.parent / "results"
    results = json.loads((out / "results.json").read_text())
    rows = list(csv.DictReader((out / "results.csv").open()))
    for eval_file in (out / "evals").rglob("seed-*.json"):
        record = json.loads(eval_file.read_text())
        arm, seed = eval_file.parent.name, int(eval_file.stem.split("-")[1])
        assert record["lm_eval"]["results"]  # lm-eval's own output is kept
        assert record["samples"]
        for task in TASKS:
            for metric, value in record["scores"][task].items():
                matches = [
                    s
                    for s in results["scores"]
                    if (s["arm"], s["task"], s["metric"], s["seed"]) == (arm, task, metric, seed)
                ]
                assert [s["value"] for s in matches] == [value]
                csv_rows = [
                    r for r in rows if (r["arm"], r["task"], r["metric"], r["seed"]) == (arm, task, metric, str(seed))
                ]
                assert [float(r["value"]) for r in csv_rows] == [value]
    built = {a["name"]: a for a in results["arms"]}
    assert built["instruct"]["build_seconds"] is None
    assert built["ties"]["build_seconds"] > 0 and built["ties"]["peak_rss_bytes"] > 0
    assert built["ta-weight=0.5"]["sweep"] == {"weight": 0.5} and built["ta-weight=0.5"]["family"] == "ta"


def test_rerun_reuses_builds_and_evaluations(compared: tuple[Path, str]) -> None:
    recipe, _ = compared
    out = recipe.parent / "results"
    before = _files(out / "stages") | {f"evals/{k}": v for k, v in _files(out / "evals").items()}
    first = json.loads((out / "results.json").read_text())["scores"]
    result = CliRunner().invoke(main, ["compare", str(recipe)])
    assert result.exit_code == 0, result.output
    after = _files(out / "stages") | {f"evals/{k}": v for k, v in _files(out / "evals").items()}
    assert after == before
    assert json.loads((out / "results.json").read_text())["scores"] == first


def test_a_second_comparison_into_the_same_folder_refuses(compared: tuple[Path, str]) -> None:
    import subprocess
    import sys

    recipe, _ = compared
    out = recipe.parent / "results"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (out.parent / ".results.lock").write_text(str(holder.pid))
        result = CliRunner().invoke(main, ["compare", str(recipe)])
        assert result.exit_code == 2
        assert f"process {holder.pid}" in result.output
    finally:
        holder.kill()
        holder.wait()
    result = CliRunner().invoke(main, ["compare", str(recipe)])  # a dead holder's lock is taken over
    assert result.exit_code == 0, result.output
    assert not (out.parent / ".results.lock").exists()
