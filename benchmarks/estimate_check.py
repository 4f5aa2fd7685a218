"""``gift-merge plan``'s estimates against measured runs: time and peak private memory, per recipe.

For each recipe: read its inputs once (the page cache warm, as a second run finds it), ask ``gift-merge plan``
for its estimate, then time ``gift-merge run --quiet`` (which skips the probe) under ``procmon.py``, which
keeps the peak ``RssAnon`` of the process tree. Estimate and run alternate recipe by recipe, so both see the
machine in the same state; ``--runs`` repeats the pair and the medians are reported.

Example (after ``make_models.py --size small``)::

    python benchmarks/estimate_check.py --size small --methods linear,ties,dare_ties,slerp --runs 3
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from procmon import run_monitored
from run import RECIPES, load_recipe, read_all

HERE = Path(__file__).resolve().parent
GIB = 1024**3
_UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0}


def estimate(gift_merge: str, recipe: Path) -> tuple[float, float, str]:
    """(seconds, GiB, the plan's own lines) from ``gift-merge plan``."""
    shown = subprocess.run([gift_merge, "plan", str(recipe)], capture_output=True, text=True, check=True).stdout
    lines = [line for line in shown.splitlines() if line.startswith("#")]
    total = next(line for line in lines if line.startswith("# time on this machine:"))
    value, unit = re.search(r"about ([0-9.]+) (s|min|h)\b", total).groups()  # type: ignore[union-attr]
    memory = next(line for line in lines if line.startswith("# memory:"))
    gib = float(re.search(r"about ([0-9.]+) GiB", memory).group(1))  # type: ignore[union-attr]
    return float(value) * _UNITS[unit], gib, "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", default="small")
    parser.add_argument("--methods", default="linear,ties,dare_ties,slerp")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=HERE.parent / "bench-work")
    parser.add_argument("--gift-merge", default=str(Path(sys.executable).parent / "gift-merge"))
    args = parser.parse_args()
    models = args.work / "models" / args.size
    rows = []
    for method in args.methods.split(","):
        recipe = load_recipe(RECIPES / f"{method}.yaml", models, args.work / "recipes" / args.size)
        out = args.work / "out" / args.size / f"estimate-{method}"
        estimates, walls, peaks, shown = [], [], [], ""
        for _ in range(args.runs):
            read_all(sorted(f for d in recipe.inputs for f in d.rglob("*.safetensors")))
            seconds, gib, shown = estimate(args.gift_merge, recipe.path)
            estimates.append((seconds, gib))
            shutil.rmtree(out, ignore_errors=True)
            log = args.work / "logs" / f"estimate-{method}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            command = [args.gift_merge, "run", str(recipe.path), str(out), "--overwrite", "--quiet"]
            result = run_monitored(command, log_path=log, interval=0.02, timeout=3600)
            if result.returncode != 0:
                raise SystemExit(f"{method}: gift-merge run failed, see {log}")
            walls.append(result.wall_s)
            peaks.append(result.peak_anon_bytes / GIB)
        print(f"## {method}\n{shown}\n", file=sys.stderr)
        rows.append((method, estimates, walls, peaks))
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {args.runs} pair(s) per recipe, medians\n")
    print("| recipe | time: plan | time: measured | ratio | peak private memory: plan | measured | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, estimates, walls, peaks in rows:
        seconds = statistics.median(e[0] for e in estimates)
        gib = statistics.median(e[1] for e in estimates)
        wall, peak = statistics.median(walls), statistics.median(peaks)
        print(
            f"| {method} | {seconds:.1f} s | {wall:.1f} s | {seconds / wall:.2f} | {gib:.2f} GiB | {peak:.2f} GiB "
            f"| {gib / peak:.2f} |"
        )
    print("\nevery pair (plan s / measured s, plan GiB / measured GiB):\n")
    for method, estimates, walls, peaks in rows:
        pairs = ", ".join(
            f"{e[0]:.1f}/{w:.1f}, {e[1]:.2f}/{p:.2f}" for e, w, p in zip(estimates, walls, peaks, strict=True)
        )
        print(f"- {method}: {pairs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
