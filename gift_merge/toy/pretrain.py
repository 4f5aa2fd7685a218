"""Pretraining the toy base: a small Llama trained from scratch on :mod:`gift_merge.toy.corpus`.

Deterministic for a fixed seed and thread count (``torch`` reductions are ordered by the thread split,
so a 1-thread and a 2-thread build differ; :func:`gift_merge.toy.family.build_toy_family` pins it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gift_merge.progress import progress
from gift_merge.toy.corpus import token_batches


@dataclass(frozen=True)
class PretrainSettings:
    """Model shape and schedule of the base. ``init_std`` above Llama's 0.02 gives the base larger
    weights, so the instruct step's change is smaller relative to them."""

    hidden: int = 96
    layers: int = 4
    heads: int = 4
    intermediate: int = 288
    init_std: float = 0.02
    steps: int = 900
    batch_size: int = 32
    length: int = 64
    lr: float = 5e-3
    warmup: int = 50
    weight_decay: float = 0.01


def new_model(tokenizer: PreTrainedTokenizerFast, settings: PretrainSettings, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama sized by ``settings``, tied embeddings (fewer parameters to train)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden,
        intermediate_size=settings.intermediate,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.heads,
        max_position_embeddings=256,
        initializer_range=settings.init_std,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain(
    tokenizer: PreTrainedTokenizerFast, settings: PretrainSettings, seed: int
) -> tuple[LlamaForCausalLM, list[float]]:
    """The trained base and its loss every 50 steps."""
    model = new_model(tokenizer, settings, seed)
    batches = token_batches(tokenizer, seed, settings.steps, settings.batch_size, settings.length)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.95),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, settings.steps, settings.warmup))
    losses: list[float] = []
    model.train()
    bar = progress(total=settings.steps, desc="pretrain the toy base", unit="step")
    for step in range(settings.steps):
        ids = batches[step]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == settings.steps - 1:
            losses.append(round(loss.item(), 4))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.update(1)
    bar.close()
    model.eval()
    return model, losses
