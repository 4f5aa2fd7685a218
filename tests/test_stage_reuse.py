"""A built stage is reused only while its recipe text and every input it read are unchanged."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from gift_merge.cli import main

TWO_STAGES = """
name: soup
merge_method: linear
models:
  - model: {math}
    parameters: {{weight: 0.5}}
  - model: {code}
    parameters: {{weight: 0.5}}
---
merge_method: linear
models:
  - model: soup
    parameters: {{weight: 1.0}}
output: final
"""


@pytest.fixture
def workspace(tmp_path: Path, llama: dict[str, Path]) -> Path:
    for name in ("math", "code"):
        shutil.copytree(llama[name], tmp_path / name)
    (tmp_path / "r.yaml").write_text(TWO_STAGES.format(math=tmp_path / "math", code=tmp_path / "code"))
    return tmp_path


def _run(workspace: Path, caplog: pytest.LogCaptureFixture) -> str:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gift_merge"):
        result = CliRunner().invoke(main, ["run", str(workspace / "r.yaml"), "--overwrite"])
    assert result.exit_code == 0, result.output
    return caplog.text


def _soup_mtimes(workspace: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (workspace / "final-stages" / "soup").iterdir()}


def test_unchanged_inputs_reuse_the_stage(workspace: Path, caplog: pytest.LogCaptureFixture) -> None:
    _run(workspace, caplog)
    before = _soup_mtimes(workspace)
    log = _run(workspace, caplog)
    assert "stage soup: up to date" in log
    assert _soup_mtimes(workspace) == before


def test_a_changed_input_model_rebuilds_the_stage(workspace: Path, caplog: pytest.LogCaptureFixture) -> None:
    _run(workspace, caplog)
    shard = sorted((workspace / "math").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"  # the last fp32 weight becomes 1.0: same size, new content
    shard.write_bytes(bytes(data))
    log = _run(workspace, caplog)
    assert f"stage soup: rebuilt, input {workspace / 'math'} changed" in log
    assert "up to date" not in log


def test_a_stage_rebuilt_in_an_earlier_run_rebuilds_its_readers(
    workspace: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reader of a stage notices the stage changed even when that happened in another run."""
    (workspace / "r.yaml").write_text(
        (workspace / "r.yaml").read_text() + "---\nname: top\nmerge_method: linear\n"
        "models:\n  - model: soup\n    parameters: {weight: 1.0}\n"
    )
    text = (workspace / "r.yaml").read_text()
    # make `top` an intermediate stage read by the final one
    parts = text.split("---\n")
    final = parts[1].replace("model: soup", "model: top")
    (workspace / "r.yaml").write_text("---\n".join([parts[0], parts[2], final]))
    _run(workspace, caplog)
    soup = workspace / "final-stages" / "soup"
    for path in soup.iterdir():  # as if an interrupted run had rebuilt soup, and not yet top
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    log = _run(workspace, caplog)
    assert "stage soup: up to date" in log
    assert "stage top: rebuilt, input stage soup changed" in log


def test_a_changed_recipe_text_says_so(workspace: Path, caplog: pytest.LogCaptureFixture) -> None:
    _run(workspace, caplog)
    recipe = workspace / "r.yaml"
    recipe.write_text(recipe.read_text().replace("weight: 0.5}", "weight: 0.25}", 1))
    log = _run(workspace, caplog)
    assert "stage soup: rebuilt, its recipe text changed" in log


def test_the_final_output_says_how_to_rebuild_it(workspace: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Card and gift_merge.json hold every document of the recipe, the version, seed, engine and input folders."""
    import json

    _run(workspace, caplog)
    final = workspace / "final"
    record = json.loads((final / "gift_merge.json").read_text())
    assert record["recipe"] == (workspace / "r.yaml").read_text()
    assert record["seed"] == 0 and record["engine"] in ("numpy", "torch") and record["gift_merge_version"]
    (soup,) = record["inputs"].values()
    assert soup["path"] == str(workspace / "final-stages" / "soup")
    soup_weights = workspace / "final-stages" / "soup" / "model.safetensors"
    assert soup["files"]["model.safetensors"] == f"bytes:{soup_weights.stat().st_size}"
    card = (final / "README.md").read_text()
    assert "base_model_relation: merge" in card
    assert "name: soup" in card and "model: soup" in card  # both documents
    assert f"`{workspace / 'final-stages' / 'soup'}`" in card


def test_a_stage_reading_no_earlier_stage_is_planned_once(
    workspace: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """soup reads only models: the plan made up front runs. The final stage reads soup, which exists only
    once built, so it is planned up front (against soup's plan) and again against the built soup."""
    import gift_merge.merge as merge

    planned: list[str] = []
    real = merge.plan_stage
    monkeypatch.setattr(
        merge, "plan_stage", lambda stage, resolver: planned.append(stage.name or "final") or real(stage, resolver)
    )
    _run(workspace, caplog)
    assert sorted(planned) == ["final", "final", "soup"]
