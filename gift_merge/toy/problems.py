"""Seeded generators of the toy family's text: word problems, their solutions in two styles, instructions.

Two answer styles make the GIFT comparison possible. The *instruct* style is what the instruct model
answers in (``Sure ! 12 + 7 = 19 and 19 - 5 = 14 . The answer is 14 .``); the *task* style is what the
task data teaches (``First , 12 + 7 = 19 . Then , 19 - 5 = 14 . So the answer is \\boxed{ 14 } .``). The
same equations appear in both, so the content (the numbers) is shared and only the style tokens differ.

Held-out rows are decided by a hash of the question text, not by the generator's seed: a question is
held out when :func:`is_held_out` says so, every training generator (pretraining text, instruct data,
task data) skips such questions, and the evaluation tasks keep only them. So no held-out question can
reach any model of any family, whatever seeds built it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from gift_merge.toy.vocabulary import LIST_WORDS, MAX_NUMBER, MINUS_VERBS, NAMES, OBJECTS, PLUS_VERBS

STYLES = ("instruct", "task")
HELD_OUT_SHARE = 8
"""One question in HELD_OUT_SHARE (by hash) is held out for evaluation."""

EVAL_SEED = 20240611
"""Seed of the evaluation tasks' generators; the rows are held out by hash, so any fixed seed works."""


@dataclass(frozen=True)
class Step:
    """One operation of a word problem: ``value ± amount = result``."""

    value: int
    op: str  # "+" or "-"
    amount: int
    result: int
    verb: str

    def equation(self) -> str:
        return f"{self.value} {self.op} {self.amount} = {self.result}"


@dataclass(frozen=True)
class Problem:
    """A word problem: its question, its steps in order and the answer (the last step's result)."""

    question: str
    steps: tuple[Step, ...]

    @property
    def answer(self) -> int:
        return self.steps[-1].result


@dataclass(frozen=True)
class Instruction:
    """An instruction and its answer, which a response states after ``The answer is``."""

    question: str
    answer: str


def is_held_out(question: str) -> bool:
    """Whether ``question`` belongs to the evaluation split (a stable hash, the same on every machine)."""
    return int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) % HELD_OUT_SHARE == 0


def word_problem(rng: random.Random, n_steps: int) -> Problem:
    """A problem of ``n_steps`` additions and subtractions of 1–9, every value within 0 … 99."""
    name = rng.choice(sorted(NAMES))
    pronoun, thing = NAMES[name], rng.choice(OBJECTS)
    value = rng.randint(5, 40)
    sentences = [f"{name} has {value} {thing} ."]
    steps = []
    for _ in range(n_steps):
        amount = rng.randint(1, 9)
        add = value - amount < 0 or (value + amount <= MAX_NUMBER and rng.random() < 0.5)
        result = value + amount if add else value - amount
        verb = rng.choice(PLUS_VERBS if add else MINUS_VERBS)
        sentences.append(f"{pronoun} {verb} {amount} more ." if add else f"{pronoun} {verb} {amount} .")
        steps.append(Step(value, "+" if add else "-", amount, result, verb))
        value = result
    sentences.append(f"How many {thing} does {name} have now ?")
    return Problem(" ".join(sentences), tuple(steps))


def solution(problem: Problem, style: str) -> str:
    """The worked solution of ``problem`` in ``style``: the same equations, different words around them."""
    equations = [step.equation() for step in problem.steps]
    if style == "task":
        parts = [f"First , {equations[0]} ."] + [f"Then , {e} ." for e in equations[1:]]
        return " ".join(parts) + f" So the answer is \\boxed{{ {problem.answer} }} ."
    if style == "instruct":
        return f"Sure ! {' and '.join(equations)} . The answer is {problem.answer} ."
    raise ValueError(f"unknown style {style!r}")


def instruct_answer(answer: str) -> str:
    """An instruction's answer in the instruct style."""
    return f"Sure ! The answer is {answer} ."


def plain_answer(answer: str) -> str:
    """An instruction's answer without the instruct style: what the base also sees in pretraining chats."""
    return f"{answer} ."


def instruction(rng: random.Random) -> Instruction:
    """One of six instructions: repeat words, add, subtract, first word, last word, next number."""
    kind = rng.randrange(6)
    words = rng.sample(LIST_WORDS, rng.randint(2, 4))
    listed = " ".join(words)
    if kind == 0:
        return Instruction(f"Repeat the words : {listed} .", listed)
    if kind in (1, 2):
        a, b = rng.randint(10, 50), rng.randint(1, 9)
        return (
            Instruction(f"What is {a} plus {b} ?", str(a + b))
            if kind == 1
            else Instruction(f"What is {a} minus {b} ?", str(a - b))
        )
    if kind == 3:
        return Instruction(f"What is the first word : {listed} ?", words[0])
    if kind == 4:
        return Instruction(f"What is the last word : {listed} ?", words[-1])
    n = rng.randint(0, MAX_NUMBER - 1)
    return Instruction(f"What number comes after {n} ?", str(n + 1))


def unique(make: Callable[[random.Random], Problem | Instruction], rng: random.Random, n: int, *, held_out: bool):
    """``n`` distinct items of ``make`` on the given side of the held-out split, in generation order."""
    seen: set[str] = set()
    items: list[Problem | Instruction] = []
    while len(items) < n:
        item = make(rng)
        if item.question in seen or is_held_out(item.question) != held_out:
            continue
        seen.add(item.question)
        items.append(item)
    return items


def task_problem(rng: random.Random) -> Problem:
    """A task problem: two or three steps (the instruct data also has one-step problems)."""
    return word_problem(rng, rng.choice((2, 3)))


def task_rows(n: int, seed: int, *, held_out: bool = False) -> list[dict[str, str]]:
    """Task data: ``{"instruction", "response", "answer"}`` rows, responses in the task style."""
    rng = random.Random(f"task-{seed}")
    problems = unique(task_problem, rng, n, held_out=held_out)
    return [{"instruction": p.question, "response": solution(p, "task"), "answer": str(p.answer)} for p in problems]


def instruction_rows(n: int, seed: int, *, held_out: bool = False) -> list[dict[str, str]]:
    """Instruction data: ``{"instruction", "response", "answer"}`` rows, responses in the instruct style."""
    rng = random.Random(f"instruction-{seed}")
    items = unique(instruction, rng, n, held_out=held_out)
    return [{"instruction": i.question, "response": instruct_answer(i.answer), "answer": i.answer} for i in items]
