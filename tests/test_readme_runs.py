"""The README's step-by-step GIFT walk-through runs as written, in a copy of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
