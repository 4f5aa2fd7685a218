"""Loading an extracted adapter the way users do, and the numbers to compare it by."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

PROMPT = torch.arange(5, 45)[None]  # (1, 40) token ids, all below the tiny vocabulary size


def merged_with_peft(base: Path, adapter: Path) -> torch.nn.Module:
    """``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()``,
    failing on peft's warnings that mean the adapter and its config disagree."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    bad = [str(w.message) for w in caught if "missing adapter keys" in str(w.message) or "unexpected" in str(w.message)]
    assert not bad, bad
    return merged.eval()


def load_model(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(PROMPT).logits[0].double()  # (T, V)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().double() for k, v in model.state_dict().items()}


def adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(adapter_config.json, adapter tensors, extraction_report.json)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    report = json.loads((folder / "extraction_report.json").read_text())
    return config, load_file(folder / "adapter_model.safetensors"), report
