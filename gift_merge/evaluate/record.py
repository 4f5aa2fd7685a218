"""What one evaluation leaves behind: a JSON record and a plain-text score table.

The record keeps lm-eval's own output next to gift-merge's flat scores, so a number in a comparison
can be traced to the lm-eval configuration (prompt, filters, generation settings) that produced it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gift_merge.evaluate.harness import EvalOptions, HarnessRun
from gift_merge.io.artifacts import package_versions


def versions() -> dict[str, str | None]:
    """Versions of the packages an evaluation's numbers depend on."""
    return package_versions("gift-merge", "lm-eval", "transformers", "torch", "peft", "math-verify")


def eval_record(
    label: str, options: EvalOptions, run: HarnessRun, seconds: float, *, keep_samples: bool
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "model": label,
        "settings": options.record(),
        "scores": run.scores,
        "stderr": run.stderr,
        "documents": run.counts,
        "seconds": round(seconds, 3),
        "versions": versions(),
        "lm_eval": run.raw,
    }
    if keep_samples:
        record["samples"] = run.samples
    return record


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON through a temporary file and a rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def score_table(run: HarnessRun) -> str:
    """Task, metric, value, standard error and document count, one metric a line."""
    rows = [("task", "metric", "value", "± stderr", "docs")]
    for task, metrics in run.scores.items():
        for metric, value in metrics.items():
            error = run.stderr.get(task, {}).get(metric)
            shown_error = f"{error:.4f}" if isinstance(error, float) and error == error else "—"
            rows.append((task, metric, f"{value:.4f}", shown_error, str(run.counts.get(task, ""))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )
