r"""Scoring a toy response: its content (the answer) apart from its format (the style it is written in).

The studies that preceded this family scored only "right answer in the task's format", which counted a
model that keeps the instruct model's style but gets every number right as a failure: exactly what GIFT
intends to do. So every response gets three scores: ``content`` (the stated answer is right, whatever
the style), ``format`` (the response is in the expected style) and ``acc`` (both).
"""

from __future__ import annotations

import re

_BOXED = re.compile(r"\\boxed\{ (.+?) \} \.?")
_STATED = re.compile(r"The answer is (.+?) \.")
_NUMBER = re.compile(r"(?<![\w{])(\d+)(?![\w}])")
TASK_FORMAT = re.compile(
    r"First , \d+ [-+] \d+ = \d+ \.( Then , \d+ [-+] \d+ = \d+ \.)* So the answer is \\boxed\{ \d+ \} \."
)
"""The task style, whole: first equation, further equations, boxed answer, nothing else."""
INSTRUCT_FORMAT = re.compile(r"Sure ! (.+ )?The answer is .+ \.")
"""The instruct style, whole: ``Sure !``, optional working, then ``The answer is X .``."""


def stated_answer(response: str) -> str | None:
    """The answer a response states: the last ``\boxed{ X }``, else the last ``The answer is X .``, else
    (for a bare answer such as ``cat dog .``) the response without its final full stop."""
    text = response.strip()
    for pattern in (_BOXED, _STATED):
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    return text.removesuffix(".").strip() or None


def stated_number(response: str) -> str | None:
    """The number a word-problem response ends on: the stated answer when it is a number, else the last
    number written anywhere."""
    answer = stated_answer(response)
    if answer is not None and answer.isdigit():
        return answer
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def score_task(response: str, gold: str) -> dict[str, float]:
    """A word problem's scores: ``content`` (the final number), ``format`` (task style), ``acc`` (both)."""
    content = float(stated_number(response) == gold)
    form = float(TASK_FORMAT.fullmatch(response.strip()) is not None)
    return {"content": content, "format": form, "acc": content * form}


def score_instruction(response: str, gold: str) -> dict[str, float]:
    """An instruction's scores: ``content`` (the stated answer), ``format`` (instruct style), ``acc`` (both)."""
    content = float(stated_answer(response) == gold)
    form = float(INSTRUCT_FORMAT.fullmatch(response.strip()) is not None)
    return {"content": content, "format": form, "acc": content * form}
