"""Checkpoints whose tensor names are not the model's module names, and architectures transformers lacks."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gift_merge.extract import ExtractOptions, extract_lora
from tests.extract.conftest import RANK
from tests.extract.peft_check import adapter, load_model, logits, merged_with_peft, relative
from tests.reference import load_all


def rewrite(src: Path, dst: Path, *, strip: str = "", config: dict | None = None) -> Path:
    dst.mkdir()
    tensors = {k.removeprefix(strip): v.contiguous() for k, v in load_all(src).items()}
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    data = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**data, **(config or {})}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
    return dst


def test_gpt2_checkpoint_without_model_prefix(bases: dict[str, Path], exact: dict[str, Path], tmp_path: Path) -> None:
    """The Hub's gpt2 stores ``h.0.attn.c_attn.weight``; peft names the module ``transformer.h.0.attn.c_attn``."""
    base = rewrite(bases["gpt2"], tmp_path / "base", strip="transformer.")
    tuned = rewrite(exact["gpt2"], tmp_path / "tuned", strip="transformer.")
    assert "h.0.attn.c_attn.weight" in load_all(base)
    extract_lora(str(base), str(tuned), tmp_path / "a", ExtractOptions(rank=RANK, quiet=True))
    _, tensors, _ = adapter(tmp_path / "a")
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in tensors
    merged, want = merged_with_peft(base, tmp_path / "a"), load_model(tuned)
    assert relative(logits(merged), logits(want)) < 1e-5


def test_unknown_architecture_falls_back_to_names(
    bases: dict[str, Path], exact: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """transformers cannot build ``model_type: mystery``: Linear layouts are guessed from names and shapes."""
    base = rewrite(bases["llama"], tmp_path / "base", config={"model_type": "mystery"})
    tuned = rewrite(exact["llama"], tmp_path / "tuned", config={"model_type": "mystery"})
    with caplog.at_level(logging.WARNING):
        report = extract_lora(str(base), str(tuned), tmp_path / "a", ExtractOptions(rank=RANK, quiet=True))
    assert "guessing layer types from names" in caplog.text
    config, tensors, _ = adapter(tmp_path / "a")
    assert len(report.lora_rows) == 21 and config["fan_in_fan_out"] is False
    assert config["target_modules"] == sorted(
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    )
    # Same factors as with the architecture known.
    extract_lora(str(bases["llama"]), str(exact["llama"]), tmp_path / "b", ExtractOptions(rank=RANK, quiet=True))
    _, known, _ = adapter(tmp_path / "b")
    assert tensors.keys() == known.keys()
    for name, value in tensors.items():
        assert torch.equal(value, known[name]), name


@pytest.mark.gpu
def test_cuda_matches_cpu(bases: dict[str, Path], exact: dict[str, Path], noisy_llama: Path, tmp_path: Path) -> None:
    for tuned, tag in ((exact["gpt2"], "exact"), (noisy_llama, "noisy")):
        base = bases["gpt2"] if tag == "exact" else bases["llama"]
        cpu = extract_lora(str(base), str(tuned), tmp_path / f"{tag}-cpu", ExtractOptions(rank=8, quiet=True))
        gpu = extract_lora(
            str(base), str(tuned), tmp_path / f"{tag}-gpu", ExtractOptions(rank=8, quiet=True, device="cuda")
        )
        for c, g in zip(cpu.lora_rows, gpu.lora_rows, strict=True):
            assert (c.name, c.rank) == (g.name, g.rank)
            assert g.energy_kept == pytest.approx(c.energy_kept, rel=1e-3), c.name
        if tag == "exact":
            _, a, _ = adapter(tmp_path / "exact-cpu")
            _, b, _ = adapter(tmp_path / "exact-gpu")
            for row in cpu.lora_rows:
                key = f"base_model.model.{row.name}.lora_"
                product = b[key + "B.weight"].double() @ b[key + "A.weight"].double()
                assert relative(product, a[key + "B.weight"].double() @ a[key + "A.weight"].double()) < 1e-5
