"""The base model's pretraining text: a seeded stream of short documents, packed into token windows.

The mixture teaches what the task needs and nothing the instruct step should have to teach from scratch:
copying (numbers and words), arithmetic facts ``a ± b = c``, word problems solved in plain text, and chat
transcripts whose answers are in *either* style. A base that has seen both styles in chats, with no
preference, lets the instruct step be a small change (prefer one style) rather than a new skill; the
studies before this family measured 7–35% weight drift when the instruct step had to teach the style.
"""

from __future__ import annotations

import random

import torch

from gift_merge.toy import problems
from gift_merge.toy.vocabulary import ASSISTANT, END, LIST_WORDS, MAX_NUMBER, USER

MIXTURE: tuple[tuple[str, float], ...] = (
    ("problem_chat", 0.35),
    ("instruction_chat", 0.15),
    ("problem_text", 0.10),
    ("facts", 0.12),
    ("copy", 0.23),
    ("count", 0.05),
)
"""Document kinds and their shares of the stream."""


def chat(question: str, answer: str) -> str:
    """A one-turn chat as the chat template renders it (a test checks the two agree), answer and end."""
    return f"{USER} {question} {END}\n{ASSISTANT} {answer} {END}\n"


def _problem(rng: random.Random) -> problems.Problem:
    return problems.unique(lambda r: problems.word_problem(r, r.randint(1, 3)), rng, 1, held_out=False)[0]


def _instruction(rng: random.Random) -> problems.Instruction:
    return problems.unique(problems.instruction, rng, 1, held_out=False)[0]


def document(rng: random.Random) -> str:
    """One document of the mixture, ending with the end token (plain text) or a finished chat turn."""
    kind = rng.choices([k for k, _ in MIXTURE], weights=[w for _, w in MIXTURE])[0]
    if kind == "problem_chat":
        problem = _problem(rng)
        return chat(problem.question, problems.solution(problem, rng.choice(problems.STYLES)))
    if kind == "instruction_chat":
        item = _instruction(rng)
        answer = problems.instruct_answer if rng.random() < 0.5 else problems.plain_answer
        return chat(item.question, answer(item.answer))
    if kind == "problem_text":
        problem = _problem(rng)
        return f"{problem.question} {' . '.join(s.equation() for s in problem.steps)} . {END}\n"
    if kind == "facts":
        facts = []
        for _ in range(6):
            a, b = rng.randint(0, 60), rng.randint(1, 9)
            facts.append(f"{a} + {b} = {a + b}" if rng.random() < 0.5 or a < b else f"{a} - {b} = {a - b}")
        return " . ".join(facts) + f" . {END}\n"
    if kind == "copy":
        items = [rng.choice(LIST_WORDS) if rng.random() < 0.5 else str(rng.randint(0, MAX_NUMBER)) for _ in range(6)]
        listed = " ".join(items[: rng.randint(2, 6)])
        return f"Copy : {listed} . {listed} . {END}\n"
    start = rng.randint(0, MAX_NUMBER - 6)
    return f"Count from {start} : {' '.join(str(n) for n in range(start, start + 6))} . {END}\n"


def token_batches(tokenizer, seed: int, steps: int, batch_size: int, length: int) -> torch.Tensor:
    """``(steps, batch_size, length)`` token ids: each window is documents of the seeded stream laid end to
    end from a document's start, the last one cut at the window's end (its rest is dropped). Starting
    every window at a document's start means every question is seen from its first word; no padding."""
    rng = random.Random(f"pretrain-{seed}")
    windows = torch.empty(steps * batch_size, length, dtype=torch.long)
    filled, window = 0, 0
    while window < len(windows):
        texts = [document(rng) for _ in range(512)]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            take = min(len(ids), length - filled)
            windows[window, filled : filled + take] = torch.tensor(ids[:take])
            filled += take
            if filled == length:
                window, filled = window + 1, 0
                if window == len(windows):
                    break
    return windows.view(steps, batch_size, length)
