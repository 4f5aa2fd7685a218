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
    return root


def test_there_are_recipes() -> None:
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(workspace: Path, recipe: Path) -> None:
    result = CliRunner().invoke(main, ["validate", str(workspace / "recipes" / recipe.name)])
    assert result.exit_code == 0, result.output


def test_demo_runs(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gift_merge.demo import main as demo

    assert demo(workspace) == 0
    out = workspace / "demo" / "merged" / "quickstart"
    assert f"merged model: {out}" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
