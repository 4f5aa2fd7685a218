"""Every shipped recipe validates on locally built models, laid out as ``make demo`` leaves them.

``make demo`` itself runs from the README's Quickstart, in a copy of the repository
(tests/test_readme_runs.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from gift_merge.cli import main
from gift_merge.toy.tiny_models import build_adapter, build_family

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

    build_toy_family(root / "demo" / "toy", seed=0, threads=2, steps_scale=SMOKE_SCALE)  # compare-demo.yaml's models
    return root


def test_there_are_recipes() -> None:
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(workspace: Path, recipe: Path) -> None:
    result = CliRunner().invoke(main, ["validate", str(workspace / "recipes" / recipe.name)])
    assert result.exit_code == 0, result.output
