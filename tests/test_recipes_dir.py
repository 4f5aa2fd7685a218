"""Every shipped recipe validates, and the quickstart runs end to end, on locally built models."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gift_merge.cli import main
from gift_merge.tiny_models import build_adapter, build_family

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of recipes/ beside demo/models/, the layout `make demo` creates."""
    root = tmp_path_factory.mktemp("workspace")
    shutil.copytree(Path(__file__).parent.parent / "recipes", root / "recipes")
    build_family(root / "demo" / "models", "llama", seed=0)
    build_adapter(root / "demo" / "models" / "base", root / "demo" / "adapters" / "math-lora", seed=0)
    from gift_merge.demo import SMOKE_SCALE
    from gift_merge.toy.family import build_toy_family

    build_toy_family(root / "demo" / "toy", seed=0, threads=2, steps_scale=SMOKE_SCALE)  # what the demo reuses
    return root


def test_there_are_recipes() -> None:
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(workspace: Path, recipe: Path) -> None:
    result = CliRunner().invoke(main, ["validate", str(workspace / "recipes" / recipe.name)])
    assert result.exit_code == 0, result.output


def test_demo_runs(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gift_merge.demo import main as demo

    assert demo(workspace, smoke=True) == 0
    printed = capsys.readouterr().out
    out = workspace / "demo" / "merged" / "quickstart"
    assert f"merged model: {out}" in printed
    assert "family checks:" in printed and "max_drift" in printed
    results = workspace / "demo" / "compare" / "toy"
    assert "sanity gates:" in printed and "shadow-ft toy_task format" in printed
    for arm in ("instruct-sft", "shadow-ft", "gift", "ties", "dare-ties"):
        assert arm in printed
    assert (results / "results.md").is_file() and (results / "scores.png").is_file()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
