"""The comparison as tables: results.md (paper style), results.csv (long format), results.json (everything),
and the plain-text table printed at the end of a run.

Scores are fractions in [0, 1] shown ×100 with one decimal, as papers print them; a cell is the mean over
seeds ± the sample standard deviation. Δ is an arm's mean minus the reference arm's mean, ×100.
The best mean per task is the highest mean at the shown precision, so arms that print equal are all marked.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from gift_merge.compare.results import ArmRecord, Comparison, metric_label

DASH = "—"  # a value that does not apply or was not measured
GIB = 2**30
TERMINAL_ARM_WIDTH = 28  # longer arm names are cut with "…" so ~10 arms × 3 tasks fit 120 columns
SETTING_WIDTH = 160  # longer meta values (per-stage build records…) are only in results.json
CSV_SCORE_COLUMNS = ["arm", "task", "metric", "seed", "value"]
CSV_ARM_COLUMNS = ["build_seconds", "peak_rss_bytes", "eval_seconds"]


def write_tables(comparison: Comparison, folder: str | Path) -> dict[str, Path]:
    """Write results.md, results.csv and results.json into ``folder``; return them keyed by "md", "csv", "json"."""
    comparison.validate()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"md": folder / "results.md", "csv": folder / "results.csv", "json": folder / "results.json"}
    paths["md"].write_text(markdown(comparison), encoding="utf-8")
    write_csv(comparison, paths["csv"])
    paths["json"].write_text(comparison.dumps(), encoding="utf-8")
    return paths


# --- formatting -------------------------------------------------------------------------------------------


def _x100(value: float) -> str:
    return f"{100 * value:.1f}"


def _cell(comparison: Comparison, arm: str, task: str, metric: str) -> str:
    """``mean ± spread`` ×100; a single seed shows the mean alone (it has no spread), a missing cell a dash."""
    mean, spread, n = comparison.summary(arm, task, metric)
    if n == 0:
        return DASH
    return _x100(mean) if n == 1 else f"{_x100(mean)} ± {_x100(spread)}"


def _delta(comparison: Comparison, arm: str, task: str) -> str:
    """The signed change in headline mean from the reference arm, ×100; the reference row itself shows a dash."""
    if comparison.reference is None or arm == comparison.reference:
        return DASH
    mean = comparison.headline_mean(arm, task)
    base = comparison.headline_mean(comparison.reference, task)
    if math.isnan(mean) or math.isnan(base):
        return DASH
    delta = round(100 * (mean - base), 1)
    return f"{delta + 0.0:+.1f}"  # + 0.0 turns -0.0 into 0.0, so no change prints "+0.0"


def _best(comparison: Comparison, task: str) -> set[str]:
    """The competing arms whose headline mean is the highest at the shown precision."""
    shown = {arm.name: round(100 * comparison.headline_mean(arm.name, task), 1) for arm in comparison.ranked_arms}
    shown = {name: value for name, value in shown.items() if not math.isnan(value)}
    top = max(shown.values(), default=math.nan)
    return {name for name, value in shown.items() if value == top}


def _seconds(arm: ArmRecord) -> str:
    return DASH if arm.build_seconds is None else f"{arm.build_seconds:.1f}"


def _gib(arm: ArmRecord) -> str:
    return DASH if arm.peak_rss_bytes is None else f"{arm.peak_rss_bytes / GIB:.2f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _coverage(comparison: Comparison, arm: str) -> str:
    """ "k of n" when the arm lacks a headline score on some task (its mean then covers fewer tasks), else ""."""
    covered = sum(not math.isnan(comparison.headline_mean(arm, t)) for t in comparison.tasks)
    return "" if covered == len(comparison.tasks) else f"{covered} of {len(comparison.tasks)}"


def _seeds_line(comparison: Comparison) -> str:
    seeds = comparison.seeds
    counts = {
        comparison.summary(arm.name, task, comparison.headline[task])[2]
        for arm in comparison.arms
        for task in comparison.tasks
    } - {0}
    line = f"{len(seeds)} ({', '.join(map(str, seeds))})" if seeds else "none scored"
    if len(counts) > 1:
        line += f"; some cells have fewer ({min(counts)}–{max(counts)} seeds per cell)"
    return line


def _role(comparison: Comparison, task: str) -> str:
    roles = [
        role for role, t in (("target", comparison.target_task), ("retention", comparison.retention_task)) if t == task
    ]
    return f" ({', '.join(roles)})" if roles else ""


# --- results.md --------------------------------------------------------------------------------------------


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(header) - 1)  # names left, numbers right
    return [_md_row(header), "| " + " | ".join(align) + " |", *(_md_row(row) for row in rows)]


def _arm_label(comparison: Comparison, arm: ArmRecord) -> str:
    return f"{arm.name} (ref)" if arm.name == comparison.reference else arm.name


def _headline_table(comparison: Comparison, arms: list[ArmRecord], bold: bool) -> list[str]:
    tasks = comparison.tasks
    header = ["Arm", *(f"{t} ({metric_label(comparison.headline[t], comparison.samples)})" for t in tasks)]
    if comparison.reference is not None:
        header += [f"Δ {t}" for t in tasks]
    header += ["Build (s)", "Peak mem (GiB)"]
    best = {t: _best(comparison, t) for t in tasks} if bold else {t: set() for t in tasks}
    rows = []
    for arm in arms:
        row = [_arm_label(comparison, arm)]
        for t in tasks:
            cell = _cell(comparison, arm.name, t, comparison.headline[t])
            row.append(f"**{cell}**" if arm.name in best[t] else cell)
        if comparison.reference is not None:
            row += [_delta(comparison, arm.name, t) for t in tasks]
        rows.append([*row, _seconds(arm), _gib(arm)])
    return _md_table(header, rows)


def _all_metrics_table(comparison: Comparison) -> list[str]:
    columns = [(t, m) for t in comparison.tasks for m in comparison.metrics(t)]
    header = ["Arm", *(f"{t} {metric_label(m, comparison.samples)}" for t, m in columns)]
    rows = [
        [_arm_label(comparison, arm), *(_cell(comparison, arm.name, t, m) for t, m in columns)]
        for arm in comparison.arms
    ]
    return _md_table(header, rows)


def _title(comparison: Comparison) -> str:
    recipe = comparison.meta.get("recipe")
    return f"# Comparison: {recipe}" if recipe else "# Comparison"


def markdown(comparison: Comparison) -> str:
    """results.md: the headline table (sanity checks apart), the settings, the ranking, then every metric."""
    n_seeds = len(comparison.seeds)
    intro = f"Scores ×100, mean ± sample standard deviation over {_count(n_seeds, 'seed')}"
    if comparison.reference is not None:
        intro += f"; Δ is the change in mean from `{comparison.reference}`, ×100"
    intro += ". **Bold**: the best mean per task. Build time in seconds, peak memory (RSS while building) in GiB."
    lines = [_title(comparison), "", intro, ""]
    if comparison.gate_arms:
        lines += ["## Sanity checks", "", "Not ranked: these rows check the setup.", ""]
        lines += [*_headline_table(comparison, comparison.gate_arms, bold=False), ""]
    lines += ["## Results", "", *_headline_table(comparison, comparison.ranked_arms, bold=True), ""]
    lines += [f"Seeds: {_seeds_line(comparison)}. Samples per item: K = {comparison.samples}.", ""]
    for task in comparison.tasks:
        metric = comparison.headline[task]
        label = metric_label(metric, comparison.samples)
        named = f"`{label}`" if label == metric else f"`{label}` (`{metric}`)"
        lines.append(f"- `{task}`{_role(comparison, task)}: {named}")
    if comparison.gates:
        lines += ["", "## Sanity gates", ""]
        lines += [
            f"- {'pass' if g.passed else '**FAIL**'}: {g.describe()}{' — ' + g.why if g.why else ''}"
            for g in comparison.gates
        ]
    lines += ["", "## Ranking", ""]
    if comparison.failed_gates:
        lines += ["Withheld: a sanity gate failed (above), so the scores do not compare what they claim to."]
    else:
        lines += [f"By the mean of the headline scores over the {_count(len(comparison.tasks), 'task')}:", ""]
        for place, (name, mean) in enumerate(comparison.ranking(), start=1):
            note = _coverage(comparison, name)
            note = f" (scored on {note} tasks)" if note else ""
            lines.append(f"{place}. {name} — {DASH if math.isnan(mean) else _x100(mean)}{note}")
    if any(len(comparison.metrics(t)) > 1 for t in comparison.tasks):
        lines += ["", "## All metrics", "", *_all_metrics_table(comparison)]
    settings = [f"- {key}: {_setting(value)}" for key, value in comparison.meta.items() if value is not None]
    if settings:
        lines += ["", "## Settings", "", *settings]
    return "\n".join(lines) + "\n"


def _setting(value: object) -> str:
    """A meta value on one line; nested records too long to read there are left to results.json."""
    if isinstance(value, str):
        return value
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= SETTING_WIDTH else "(see results.json)"


# --- results.csv -------------------------------------------------------------------------------------------


def write_csv(comparison: Comparison, path: str | Path) -> None:
    """Long format, one row per score, with its arm's costs and sweep values (``sweep.<param>``) repeated."""
    params: list[str] = []
    for arm in comparison.arms:
        params += [p for p in arm.sweep or {} if p not in params]
    columns = [*CSV_SCORE_COLUMNS, *CSV_ARM_COLUMNS, *(f"sweep.{p}" for p in params)]
    arms = {arm.name: arm for arm in comparison.arms}
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for score in comparison.scores:
            arm = arms[score.arm]
            row: dict[str, object] = {
                "arm": score.arm,
                "task": score.task,
                "metric": score.metric,
                "seed": score.seed,
                "value": repr(float(score.value)),  # repr round-trips a float exactly
                "build_seconds": "" if arm.build_seconds is None else repr(float(arm.build_seconds)),
                "peak_rss_bytes": "" if arm.peak_rss_bytes is None else arm.peak_rss_bytes,
                "eval_seconds": "" if arm.eval_seconds is None else repr(float(arm.eval_seconds)),
            }
            for p in params:
                value = (arm.sweep or {}).get(p)
                row[f"sweep.{p}"] = "" if value is None else repr(float(value))
            writer.writerow(row)


# --- terminal ----------------------------------------------------------------------------------------------


def _cut(name: str, width: int) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _terminal_cells(comparison: Comparison, arms: list[ArmRecord], task: str, best: set[str]) -> list[str]:
    """One task's cells, ``mean ± sd* Δ``, padded inside so the numbers line up down the column."""
    metric = comparison.headline[task]
    parts: list[tuple[str, str, str, str] | None] = []  # (mean, sd, best mark, Δ) as text; None: not scored
    for arm in arms:
        mean, spread, n = comparison.summary(arm.name, task, metric)
        if n == 0:
            parts.append(None)
            continue
        delta = _delta(comparison, arm.name, task) if comparison.reference is not None else ""
        parts.append((_x100(mean), _x100(spread) if n > 1 else "", "*" if arm.name in best else " ", delta))
    present = [p for p in parts if p is not None]
    wm, ws, _, wd = (max((len(p[k]) for p in present), default=0) for k in range(4))
    cells = []
    for part in parts:
        if part is None:
            cells.append(DASH)
            continue
        mean_text, sd_text, mark, delta_text = part
        sd = (f" ± {sd_text:<{ws}}" if sd_text else " " * (ws + 3)) if ws else ""  # one seed: no spread to show
        cells.append(f"{mean_text:>{wm}}{sd}{mark}" + (f" {delta_text:>{wd}}" if wd else ""))
    width = max((len(c) for c in cells), default=0)
    return [c.rjust(width) for c in cells]


def terminal_table(comparison: Comparison) -> str:
    """The table printed at the end of a run: plain aligned text that reads the same in a log or CI output."""
    comparison.validate()
    arms = comparison.gate_arms + comparison.ranked_arms
    n_gates = len(comparison.gate_arms)
    names = [_cut(_arm_label(comparison, arm), TERMINAL_ARM_WIDTH) for arm in arms]
    columns: list[tuple[str, str, list[str], str]] = [("arm", "", names, "<")]
    for task in comparison.tasks:
        best = _best(comparison, task)
        cells = _terminal_cells(comparison, arms, task, best)
        label = metric_label(comparison.headline[task], comparison.samples)
        columns.append((task, label, cells, "<"))
    columns.append(("build s", "", [_seconds(arm) for arm in arms], ">"))
    columns.append(("peak GiB", "", [_gib(arm) for arm in arms], ">"))

    widths = [max(len(head), len(sub), *(len(c) for c in cells)) for head, sub, cells, _ in columns]
    if comparison.reference is not None:  # "Δ" sits over the deltas at the right of each task column
        columns = [
            (head, sub.ljust(width - 1) + "Δ" if 0 < i <= len(comparison.tasks) else sub, cells, align)
            for i, ((head, sub, cells, align), width) in enumerate(zip(columns, widths, strict=True))
        ]

    def line(cells: list[str]) -> str:
        padded = [
            cell.ljust(w) if align == "<" else cell.rjust(w)
            for cell, w, (_, _, _, align) in zip(cells, widths, columns, strict=True)
        ]
        return "  ".join(padded).rstrip()

    n_seeds = len(comparison.seeds)
    intro = f"scores ×100, mean ± sd over {_count(n_seeds, 'seed')}, K={comparison.samples}"
    if comparison.reference is not None:
        intro += f"; Δ vs {comparison.reference}"
    out = [intro + "; * best per task"]
    roles = [
        f"{role}: {task}"
        for role, task in (("target", comparison.target_task), ("retention", comparison.retention_task))
        if task
    ]
    if roles:
        out.append(" · ".join(roles))
    out.append(line([head for head, _, _, _ in columns]))
    if any(sub for _, sub, _, _ in columns):
        out.append(line([sub for _, sub, _, _ in columns]))
    rule = line(["-" * w for w in widths])
    out.append(rule)
    rows = [[cells[i] for _, _, cells, _ in columns] for i in range(len(arms))]
    if n_gates:
        out += ["sanity checks (not ranked):", *(line(row) for row in rows[:n_gates]), rule]
    out += [line(row) for row in rows[n_gates:]]
    if comparison.gates:
        out += ["", "sanity gates:"]
        out += [
            f"  {'pass' if g.passed else 'FAIL'}  {g.describe()}{' — ' + g.why if g.why else ''}"
            for g in comparison.gates
        ]
    if comparison.failed_gates:
        out += ["", "ranking withheld: a sanity gate failed, so the scores do not compare what they claim to"]
        return "\n".join(out)
    ranking = [
        f"{place}. {name} {DASH if math.isnan(mean) else _x100(mean)}"
        + (f" ({_coverage(comparison, name)} tasks)" if _coverage(comparison, name) else "")
        for place, (name, mean) in enumerate(comparison.ranking(), start=1)
    ]
    out += ["", *_wrap("ranking (mean headline score): ", ranking, 120)]
    return "\n".join(out)


def _wrap(prefix: str, items: list[str], width: int) -> list[str]:
    """``prefix`` then the items joined by " · ", broken into lines of at most ``width`` where items allow."""
    lines, current = [], prefix
    for i, item in enumerate(items):
        piece = item if current.endswith(" ") else " · " + item
        if current.strip() and len(current) + len(piece) > width and i:
            lines.append(current.rstrip())
            current = " " * len(prefix) + item
        else:
            current += piece
    lines.append(current.rstrip())
    return lines
