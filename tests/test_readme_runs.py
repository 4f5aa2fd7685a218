"""The README's command blocks run as written, in a copy of the repository: the Quickstart and the
step-by-step GIFT walk-through."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FULL_DEMO = os.environ.get("GIFT_MERGE_FULL_DEMO") == "1"
"""Run the Quickstart's ``make demo`` at its real size (3–4 min on 2 cores) instead of ``DEMO_ARGS=--smoke``."""


def _bash_block(heading: str) -> str:
    """The first ```bash block after ``heading`` in README.md, exactly as written."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```bash\n", text.index(heading)) + len("```bash\n")
    return text[start : text.index("```", start)]


def _commands(block: str) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def _copy_repository(target: Path) -> None:
    """The working tree as a clone has it: tracked files and new ones git does not ignore (not ``.venv``,
    ``demo/`` or caches), with their times, so make's up-to-date check sees what it would in a clone."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=False,
    )  # fmt: skip
    if listed.returncode == 0:
        for name in filter(None, listed.stdout.decode().split("\0")):
            source = ROOT / name
            if source.is_file():  # a tracked file deleted in the working tree is not in a clone of it either
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name)
        return
    ignored = shutil.ignore_patterns(".git", ".venv", "demo", "bench-work", "build", "dist", "*.egg-info", "__pycache__",
                                     ".*_cache", ".hypothesis")  # fmt: skip
    shutil.copytree(ROOT, target, ignore=ignored, dirs_exist_ok=True)


def _installed_venv(repo: Path) -> None:
    """``repo/.venv`` as ``make`` leaves it, made of the virtualenv running this test (its ``bin`` and
    ``lib``), with a fresh install stamp: make runs the targets' commands and never pip."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests do not run in a virtualenv, whose packages the copy's .venv would share")
    venv = repo / ".venv"
    venv.mkdir()
    shutil.copy2(Path(sys.prefix) / "pyvenv.cfg", venv / "pyvenv.cfg")
    for part in ("bin", "lib", "lib64"):
        if (Path(sys.prefix) / part).exists():
            (venv / part).symlink_to(Path(sys.prefix) / part)
    (venv / ".installed").touch()


@pytest.mark.slow
def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    """The Quickstart block in a fresh copy: ``make demo`` (the pipeline at smoke size unless
    GIFT_MERGE_FULL_DEMO=1) and ``make test``. That suite is this one, and CI runs it through that very line
    (.ci/run); here the line runs pytest in the copy on this file alone, collecting only, since running the
    suite inside itself would recurse."""
    block = _bash_block("## Quickstart")
    assert _commands(block) == ["make demo", "make test"], "the Quickstart changed: run its new commands here"
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == "make test"
    repo = tmp_path / "repo"
    _copy_repository(repo)
    _installed_venv(repo)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(HF_HUB_OFFLINE="1", PYTEST_ADDOPTS="--collect-only -p no:cacheprovider tests/test_readme_runs.py")
    if not FULL_DEMO:
        env["DEMO_ARGS"] = "--smoke"
    result = subprocess.run(["bash", "-c", "set -euo pipefail\n" + block], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=1200)  # fmt: skip
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    printed = result.stdout
    assert "pip install" not in printed  # make found the venv installed
    out = repo / "demo" / "merged" / "quickstart"
    assert f"merged model: {out}" in printed
    assert "family checks:" in printed and "max_drift" in printed
    assert "sanity gates:" in printed and "shadow-ft toy_task format" in printed
    for arm in ("instruct-sft", "shadow-ft", "gift", "ties", "dare-ties"):
        assert arm in printed
    results = repo / "demo" / "compare" / "toy"
    assert (results / "results.md").is_file() and (results / "scores.png").is_file()
    assert "`source .venv/bin/activate` puts gift-merge on the PATH" in printed
    assert "test_readme_runs.py::test_quickstart_runs_as_written" in printed  # `make test` ran pytest in the copy
    import torch
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def _walkthrough() -> str:
    """The shell block of "Train a GIFT adapter" that starts by activating the venv."""
    text = (ROOT / "README.md").read_text()
    start = text.index("source .venv/bin/activate   # after `make demo`")
    return text[start : text.index("```", start)]


@pytest.mark.slow
def test_gift_walkthrough_runs_as_written(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "recipes", repo / "recipes")
    venv_bin = repo / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    # the activate script of the venv running this test: its interpreter's folder first on PATH
    (venv_bin / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = "set -euo pipefail\n" + _walkthrough()
    result = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (repo / "demo" / "gift-adapter" / "adapter_model.safetensors").is_file()
    assert (repo / "demo" / "tiny" / "instruct-gift" / "config.json").is_file()
    assert "merged model written to" in result.stdout
