"""What the extraction kept and what it lost, per module: the table printed at the end and
``extraction_report.json`` beside the adapter.

The number that matters for a LoRA module is the fraction of the delta's energy it keeps,
Σ kept S² / ‖Δ‖²_F = 1 − ‖Δ − B·A‖²_F / ‖Δ‖²_F, so 1.0 means the adapter reproduces that delta exactly.
Dropped tensors report ‖Δ‖ / ‖W_base‖, the size of the change the adapter does not carry.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Action = Literal["lora", "save", "dropped", "unchanged"]


@dataclass(frozen=True)
class ModuleRow:
    """One tensor's (or one LoRA module's) outcome."""

    name: str  # module for LoRA and saved modules, tensor for dropped ones
    action: Action
    shape: tuple[int, ...]
    rank: int | None = None
    max_rank: int | None = None
    energy_kept: float | None = None  # fraction of ‖Δ‖²_F kept
    delta_energy: float | None = None  # ‖Δ‖²_F
    relative_delta: float | None = None  # ‖Δ‖_F / ‖W_base‖_F
    svd: str | None = None
    reason: str | None = None


@dataclass
class ExtractionReport:
    base: str
    tuned: str
    output: str
    settings: dict[str, Any]
    rows: list[ModuleRow] = field(default_factory=list)
    r: int = 0
    adapter_bytes: int = 0

    @property
    def lora_rows(self) -> list[ModuleRow]:
        return [row for row in self.rows if row.action == "lora"]

    @property
    def energy_kept(self) -> float:
        """Kept energy over all LoRA modules, weighted by each delta's energy."""
        rows = self.lora_rows
        total = sum(row.delta_energy or 0.0 for row in rows)
        kept = sum((row.delta_energy or 0.0) * (row.energy_kept or 0.0) for row in rows)
        return kept / total if total else 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "tuned": self.tuned,
            "output": self.output,
            "settings": self.settings,
            "r": self.r,
            "adapter_bytes": self.adapter_bytes,
            "energy_kept": self.energy_kept,
            "modules": [{k: v for k, v in asdict(row).items() if v is not None} for row in self.rows],
        }

    def table(self) -> str:
        """The human summary: one line per LoRA module, then what was saved whole and what was lost."""
        lines = []
        rows = self.lora_rows
        if rows:
            width = max(len(row.name) for row in rows)
            lines.append(f"{'module':<{width}}  {'shape':>11}  {'rank':>9}  {'energy kept':>11}  svd")
            for row in rows:
                shape = "×".join(str(d) for d in row.shape)
                rank = f"{row.rank}/{row.max_rank}"
                lines.append(f"{row.name:<{width}}  {shape:>11}  {rank:>9}  {_percent(row.energy_kept):>11}  {row.svd}")
        saved = [row for row in self.rows if row.action == "save"]
        if saved:
            lines.append(f"saved whole (modules_to_save): {', '.join(row.name for row in saved)}")
        dropped = [row for row in self.rows if row.action == "dropped"]
        if dropped:
            lines.append("dropped (the adapter does not carry these changes):")
            width = max(len(row.name) for row in dropped)
            for row in dropped:
                size = "" if row.relative_delta is None else f"‖Δ‖/‖W‖ = {row.relative_delta:.2e}  "
                lines.append(f"  {row.name:<{width}}  {size}{row.reason}")
        unchanged = [row for row in self.rows if row.action == "unchanged"]
        if unchanged:
            lines.append(f"unchanged (identical in both models): {len(unchanged)} tensor(s)")
        lines.append(
            f"{len(rows)} LoRA modules, r = {self.r}, {_percent(self.energy_kept)} of the delta energy kept; "
            f"adapter {self.adapter_bytes / 1e6:.2f} MB in {self.output}"
        )
        return "\n".join(lines)


def _percent(fraction: float | None) -> str:
    if fraction is None or math.isnan(fraction):
        return "-"
    return f"{100 * fraction:.3f}%"
