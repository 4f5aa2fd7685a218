"""What the toy family records about itself: weight drift, quick greedy scores and the instruct model's
token confidence q_t on the task data.

These are measured while building, in-process and greedily, so ``family.json`` can state whether the
family is fit for a comparison before anything is trained on it; the comparison itself scores the
models through lm-eval with the tasks in ``gift_merge/evaluate/tasks/toy_*.yaml``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from gift_merge.toy.corpus import chat
from gift_merge.toy.instruct import trained_matrices

STYLE_SHARE_THRESHOLD = 0.1
"""q below this counts as "the instruct model would not write this token": GIFT gives it little weight."""


@torch.no_grad()
def drift(base: LlamaForCausalLM, instruct: LlamaForCausalLM) -> dict[str, float]:
    """``‖W_I − W_B‖ / ‖W_B‖`` of every weight that differs, by parameter name."""
    before = dict(base.named_parameters())
    out: dict[str, float] = {}
    for name, weight in instruct.named_parameters():
        delta = float((weight - before[name]).norm())
        if delta > 0:
            out[name] = round(delta / float(before[name].norm()), 5)
    return out


@torch.no_grad()
def layer_drift(base: LlamaForCausalLM, instruct: LlamaForCausalLM) -> dict[str, float]:
    """Relative drift of each decoder layer, all its linear weights taken as one vector."""
    before = dict(base.named_parameters())
    sums: dict[str, list[float]] = {}
    for name, weight in trained_matrices(instruct).items():
        layer = name.split(".mlp.")[0].split(".self_attn.")[0]
        total = sums.setdefault(layer, [0.0, 0.0])
        total[0] += float((weight - before[name]).norm()) ** 2
        total[1] += float(before[name].norm()) ** 2
    return {layer: round((d / b) ** 0.5, 5) for layer, (d, b) in sums.items()}


@torch.no_grad()
def greedy(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, questions: list[str], max_new_tokens: int = 48
) -> list[str]:
    """Greedy answers to one-turn chats, decoded without special tokens, in batches of 64."""
    answers: list[str] = []
    tokenizer.padding_side = "left"
    for start in range(0, len(questions), 64):
        prompts = [
            str(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
                )
            )
            for q in questions[start : start + 64]
        ]
        batch = tokenizer(prompts, add_special_tokens=False, return_tensors="pt", padding=True)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    tokenizer.padding_side = "right"
    return [a.strip() for a in answers]


def mean_scores(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    rows: list[dict[str, str]],
    score: Callable[[str, str], dict[str, float]],
) -> dict[str, float]:
    """Mean of each metric of ``score`` over greedy answers to ``rows``."""
    results = [
        score(a, r["answer"])
        for a, r in zip(greedy(model, tokenizer, [r["instruction"] for r in rows]), rows, strict=True)
    ]
    return {key: round(statistics.fmean(r[key] for r in results), 4) for key in results[0]}


@torch.no_grad()
def confidence(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, rows: list[dict[str, str]]
) -> dict[str, float]:
    """q_t = p(y_t | x, y_<t) of the task responses' tokens (the end token excluded, as GIFT's annotation
    does) summarised by kind: numbers in the equations, the final answer, and the style words."""
    kinds: dict[str, list[float]] = {"all": [], "equation_numbers": [], "answer": [], "style": []}
    for row in rows:
        ids = tokenizer(chat(row["instruction"], row["response"]), add_special_tokens=False)["input_ids"]
        n = len(tokenizer(row["response"], add_special_tokens=False)["input_ids"])
        start = len(ids) - 1 - n  # the response sits before the final end token
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        probs = torch.softmax(logits[start - 1 : start - 1 + n], dim=-1)
        targets = ids[start : start + n]
        tokens = tokenizer.convert_ids_to_tokens(targets)
        boxed = tokens.index("\\boxed{") if "\\boxed{" in tokens else -1
        for i, (token, target) in enumerate(zip(tokens, targets, strict=True)):
            q = float(probs[i, target])
            kinds["all"].append(q)
            if i == boxed + 1 and boxed >= 0:
                kinds["answer"].append(q)
            elif token.isdigit():
                kinds["equation_numbers"].append(q)
            else:
                kinds["style"].append(q)
    summary: dict[str, float] = {}
    for kind, values in kinds.items():
        summary[f"mean_{kind}"] = round(statistics.fmean(values), 4)
        summary[f"below_{STYLE_SHARE_THRESHOLD}_{kind}"] = round(
            sum(v < STYLE_SHARE_THRESHOLD for v in values) / len(values), 4
        )
    return summary
