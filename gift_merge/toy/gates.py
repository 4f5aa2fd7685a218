"""The sanity gates of a comparison on the toy family, as rows to print before any ranking.

A ranking on the toy family means something only when the family is what it claims to be and the
transfer that Shadow-FT and GIFT rely on works on it. So the demo reports, and flags when failed:

- the family's own gates from ``family.json``: per-matrix drift ‖W_I − W_B‖/‖W_B‖ within 3%, the instruct
  model competent on the task's content and on the instructions;
- the instruct model's confidence q_t on the task data: its mean on the final answer token, and the share of
  tokens below 0.1 (the tokens GIFT nearly ignores), reported, not gated;
- the transfer gate lives in ``recipes/compare-demo.yaml`` as ``gates:`` of the comparison: the uniform SFT
  adapter trained on the base and added to the instruct model (the ``shadow-ft`` arm) keeps the task format
  and the instruction format at 0.9 or more. When it fails, every base-trained adapter arm (Shadow-FT,
  GIFT) measures a broken transfer, not a method, and the comparison withholds its ranking.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Gate:
    """One sanity row: what was measured, its value, the bound, and whether it held (None: reported only)."""

    name: str
    value: float
    bound: str
    passed: bool | None
    why: str

    def line(self) -> str:
        mark = {True: "pass", False: "FAIL", None: "info"}[self.passed]
        return f"[{mark}] {self.name} = {self.value:.3f} ({self.bound}) — {self.why}"


def family_gates(family_json: Path) -> list[Gate]:
    """The gates ``build_toy_family`` measured, and the q_t summary."""
    record = json.loads(Path(family_json).read_text())
    why = {
        "max_drift": "the instruct model must be a small change of the base for a base-trained adapter to transfer",
        "instruct_task_content": "the instruct model must know the task's content for style to be the difference",
        "instruct_instruction_acc": "the instruct model must follow instructions for retention to be measurable",
    }
    gates = []
    for name, gate in record["gates"].items():
        bound = f"≤ {gate['threshold']}" if name == "max_drift" else f"≥ {gate['threshold']}"
        gates.append(Gate(name, gate["value"], bound, gate["passed"], why[name]))
    q = record["confidence"]
    gates.append(Gate("q_answer_mean", q["mean_answer"], "reported", None, "instruct confidence on the final answer"))
    gates.append(Gate("q_below_0.1", q["below_0.1_all"], "reported", None, "share of task tokens GIFT nearly ignores"))
    gates.append(Gate("q_style_mean", q["mean_style"], "reported", None, "instruct confidence on style words"))
    return gates
