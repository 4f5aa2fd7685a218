"""An exactly rank-R delta comes back exactly, and peft turns the adapter back into the tuned model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gift_merge.extract import ExtractOptions, extract_lora
from tests.extract.conftest import ARCHS, RANK
from tests.extract.peft_check import adapter, load_model, logits, merged_with_peft, relative, state
from tests.reference import load_all


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_rank_delta_round_trips(
    arch: str, bases: dict[str, Path], exact: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "adapter"
    # Ask for more than the true rank: the numerical rank (4) is what gets written.
    report = extract_lora(str(bases[arch]), str(exact[arch]), out, ExtractOptions(rank=RANK + 3, quiet=True))
    config, tensors, saved_report = adapter(out)

    assert config["r"] == config["lora_alpha"] == RANK
    assert config["rank_pattern"] == config["alpha_pattern"] == {}
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert saved_report["energy_kept"] == pytest.approx(1.0, abs=1e-6)

    base, tuned = load_all(bases[arch]), load_all(exact[arch])
    rows = {row.name: row for row in report.lora_rows}
    assert len(rows) == sum(1 for n, t in tuned.items() if t.ndim == 2 and (".layers." in n or ".h." in n))
    for module, row in rows.items():
        delta = tuned[f"{module}.weight"].double() - base[f"{module}.weight"].double()
        A = tensors[f"base_model.model.{module}.lora_A.weight"].double()
        B = tensors[f"base_model.model.{module}.lora_B.weight"].double()
        product = B @ A if arch != "gpt2" else (B @ A).T  # Conv1D stores [in, out]: peft transposes
        assert A.shape[0] == row.rank == RANK
        assert relative(product, delta) < 1e-5, module
        assert row.energy_kept == pytest.approx(1.0, abs=1e-6)

    merged = merged_with_peft(bases[arch], out)
    reference = load_model(exact[arch])
    ours, want = state(merged), state(reference)
    for name, value in want.items():
        assert relative(ours[name], value) < 1e-5 if value.norm() > 0 else torch.equal(ours[name], value), name
    assert relative(logits(merged), logits(reference)) < 1e-5


def test_bf16_adapter_and_randomized_svd_are_deterministic(
    bases: dict[str, Path], exact: dict[str, Path], tmp_path: Path
) -> None:
    opts = ExtractOptions(rank=RANK, quiet=True, dtype=torch.bfloat16, svd="randomized", seed=3)
    extract_lora(str(bases["llama"]), str(exact["llama"]), tmp_path / "a", opts)
    extract_lora(str(bases["llama"]), str(exact["llama"]), tmp_path / "b", opts)
    first = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert first == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    _, tensors, report = adapter(tmp_path / "a")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert {row["svd"] for row in report["modules"] if row["action"] == "lora"} == {"randomized"}
