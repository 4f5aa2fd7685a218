"""lm-evaluation-harness tasks shipped with gift-merge, so the GIFT paper's benchmarks run offline.

Each ``gift_*.yaml`` here is an lm-eval task over a 200-row slice in ``data/`` (see ``data/README.md``
for sources and licences); ``hooks.py`` holds the functions the YAMLs name. Load them with
``lm_eval.tasks.TaskManager(include_path=str(TASKS_DIR))``.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR: Path = Path(__file__).parent
"""The folder lm-eval indexes for the shipped tasks."""

SHIPPED_TASKS: dict[str, str] = {
    "gift_gsm8k": "grade-school math, chain of thought to \\boxed{} (200 GSM8K problems); acc, pass_at_k, maj_at_k",
    "gift_svamp": "arithmetic word problems, reasoning to \\boxed{} (200 SVAMP problems); acc, pass_at_k, maj_at_k",
    "gift_mmlu_stem": "STEM knowledge, 4-way multiple choice by log-likelihood (200 MMLU STEM rows); acc, acc_norm",
    "gift_sni": "instruction following, held-out Super-NaturalInstructions tasks (200 prompts); rougeL, exact_match",
    "toy_task": "toy family (gift_merge.toy): 200 held-out word problems, task style; acc, content, format",
    "toy_instruct": "toy family (gift_merge.toy): 200 held-out instructions, instruct style; acc, format, content",
}
"""Task name → what it measures, its size and its metrics (``gift-merge eval --list-tasks`` prints these)."""
