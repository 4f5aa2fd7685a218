"""PEFT adapters of every kind the merge core handles, made by peft itself on the tiny base models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("llama", {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS}),
    "rslora-patterns": (
        "llama",
        {
            "r": 6,
            "lora_alpha": 5,
            "use_rslora": True,
            "target_modules": LLAMA_TARGETS,
            "rank_pattern": {"q_proj": 2, "layers.1.mlp.up_proj": 3},
            "alpha_pattern": {"down_proj": 11},
        },
    ),
    "gpt2-conv1d": (
        "gpt2",
        {"r": 4, "lora_alpha": 16, "target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True},
    ),
    "qwen2-bias": (
        "qwen2",
        {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj", "v_proj"], "lora_bias": True},
    ),
    "qwen2-tied-embedding": ("qwen2", {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "o_proj"]}),
    "llama-embedding": ("llama", {"r": 3, "lora_alpha": 6, "target_modules": ["embed_tokens", "lm_head", "up_proj"]}),
    "modules-to-save": (
        "llama",
        {"r": 2, "lora_alpha": 2, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head", "norm"]},
    ),
    "dora": (
        "llama",
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj", "down_proj"], "use_dora": True},
    ),
}


def make_adapter(base: Path, out: Path, seed: int, **lora: Any) -> Path:
    """A peft adapter on ``base`` with every trainable tensor randomised, as training would leave it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=gen) * 0.05
                param.copy_(param * 1.1 + noise if "magnitude" in name else noise)
    peft_model.save_pretrained(out)
    return out
