"""The instruct step: a short fine-tune of the base into the instruct style, kept within a trust region.

The base has seen chat answers in both styles; the instruct model is the base taught to prefer one (the
instruct style, for word problems and for instructions). Only the decoder's linear layers train (the
embeddings, the tied output head and the norms stay the base's), and after every optimizer step each
trained matrix is projected back into the ball ``‖W − W_B‖ ≤ max_drift · ‖W_B‖``. So the instruct model
is by construction a small change of the base, as a real instruct model is relative to its base, which
is what lets an adapter trained on the base transfer; the studies before this family reached 7–35%
drift without the projection and every transferred adapter broke.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from gift_merge.toy import problems
from gift_merge.toy.corpus import chat


@dataclass(frozen=True)
class InstructSettings:
    """Instruct data size and mix, and the projected fine-tune's schedule."""

    rows: int = 2000
    problem_share: float = 0.4
    steps: int = 60
    batch_size: int = 32
    lr: float = 3e-4
    max_drift: float = 0.025


def instruct_rows(n: int, seed: int, problem_share: float) -> list[dict[str, str]]:
    """The instruct data: word problems of one to three steps and instructions, all in the instruct style,
    none of them held out."""
    rng = random.Random(f"instruct-{seed}")
    n_problems = round(n * problem_share)
    found = problems.unique(lambda r: problems.word_problem(r, r.randint(1, 3)), rng, n_problems, held_out=False)
    rows = [
        {"instruction": p.question, "response": problems.solution(p, "instruct"), "answer": str(p.answer)}
        for p in found
    ]
    rows += problems.instruction_rows(n - n_problems, seed)
    rng.shuffle(rows)
    return rows


def response_batch(tokenizer: PreTrainedTokenizerFast, rows: list[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids of each chat and labels that score only the response and its end token."""
    encoded = []
    for row in rows:
        full = tokenizer(chat(row["instruction"], row["response"]), add_special_tokens=False)["input_ids"]
        answer = len(tokenizer(row["response"] + " <|end|>", add_special_tokens=False)["input_ids"])
        encoded.append((full, len(full) - answer))
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (full, start) in enumerate(encoded):
        ids[i, : len(full)] = torch.tensor(full)
        labels[i, start : len(full)] = torch.tensor(full[start:])
    return ids, labels


def trained_matrices(model: LlamaForCausalLM) -> dict[str, torch.nn.Parameter]:
    """The decoder's linear weights: what the instruct step changes (embeddings and norms stay frozen)."""
    return {n: p for n, p in model.named_parameters() if ".layers." in n and p.ndim == 2}


def instruct_tune(
    base: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    rows: list[dict[str, str]],
    settings: InstructSettings,
    seed: int,
) -> tuple[LlamaForCausalLM, list[float]]:
    """The instruct model (``base`` is changed in place and returned) and its loss every 10 steps."""
    model = base
    matrices = trained_matrices(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in matrices.values():
        parameter.requires_grad_(True)
    start = {n: p.detach().clone() for n, p in matrices.items()}
    limits = {n: settings.max_drift * float(w.norm()) for n, w in start.items()}
    optimizer = torch.optim.AdamW(list(matrices.values()), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(f"instruct-order-{seed}")
    losses: list[float] = []
    model.train()
    for step in range(settings.steps):
        ids, labels = response_batch(tokenizer, rng.sample(rows, settings.batch_size))
        loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, weight in matrices.items():
                delta = weight - start[name]
                norm = float(delta.norm())
                if norm > limits[name]:
                    weight.copy_(start[name] + delta * (limits[name] / norm))
        if step % 10 == 0 or step == settings.steps - 1:
            losses.append(round(loss.item(), 4))
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model, losses
