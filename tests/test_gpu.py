"""``--device cuda`` gives the CPU's result (random masks are drawn on the CPU either way)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gift_merge.cli import main
from tests import reference as ref

pytestmark = pytest.mark.gpu

RECIPE = """
merge_method: {method}
base_model: {base}
models:
  - model: {math}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {code}
    parameters: {{weight: 0.4, density: 0.7}}
dtype: bfloat16
"""


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della"])
def test_cuda_matches_cpu(tmp_path: Path, llama: dict[str, Path], method: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(method=method, **llama))
    outputs = {}
    for device in ("cpu", "cuda"):
        result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / device), "-q", "--device", device])
        assert result.exit_code == 0, result.output
        outputs[device] = ref.load_all(tmp_path / device)
    for name, cpu in outputs["cpu"].items():
        ref.assert_close(outputs["cuda"][name], cpu.double().numpy(), torch.bfloat16, name)
