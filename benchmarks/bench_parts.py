"""Scale-out numbers: one process against 2 parts in parallel (`run --part i/n`), and Ray's overhead.

For each recipe, ``--runs`` rounds of: a single-process run; the 2 parts started together (the wall time
until both exit, the last one finalizing); ``--executor ray --parts 2`` from the command line (starting a
local Ray instance); and, in this process with Ray already started, the same run through
:func:`gift_merge.ray_executor.run_on_ray` with 2 parts and with 1, against :func:`gift_merge.merge.run_recipe`
in this process (Ray's per-merge overhead without its start-up). Every output is
compared byte for byte with the single-process run's. Medians; the page cache is warmed first.

    .venv/bin/python benchmarks/bench_parts.py --size small --recipes linear,dare_ties --runs 3
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GIFT = ROOT / ".venv" / "bin" / "gift-merge"


def same_folders(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*"))
    if names != sorted(p.relative_to(b).as_posix() for p in b.rglob("*")):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names if (a / n).is_file())


def timed(commands: list[list[str]]) -> float:
    start = time.monotonic()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in commands]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"{proc.args}: exit {proc.returncode}\n{err[-2000:]}")
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="small")
    parser.add_argument("--recipes", default="linear,dare_ties")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--shard-size", default="250MB")
    parser.add_argument("--work", type=Path, default=ROOT / "bench-work" / "parts")
    args = parser.parse_args()
    models = ROOT / "bench-work" / "models" / args.size
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    import ray

    from gift_merge.merge import MergeOptions, run_recipe
    from gift_merge.ray_executor import run_on_ray
    from gift_merge.recipe import load_recipe

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20, logging_level="ERROR")
    results: dict[str, dict[str, list[float]]] = {}
    for name in args.recipes.split(","):
        recipe = work / f"{name}.yaml"
        recipe.write_text((HERE / "recipes" / f"{name}.yaml").read_text().replace("${MODELS}", str(models)))
        common = ["-q", "run", str(recipe)]
        shard = ["--out-shard-size", args.shard_size]
        kinds = ("single", "parts2", "parts2_w1", "ray_cli", "ray_warm", "inproc_single", "ray_warm_p1")
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        timed([[str(GIFT), *common, str(work / f"warm-{name}"), *shard]])  # page cache
        for i in range(args.runs):
            outs = {k: work / f"{name}-{k}-{i}" for k in times}
            times["single"].append(timed([[str(GIFT), *common, str(outs["single"]), *shard]]))
            parts = [[str(GIFT), *common, str(outs["parts2"]), *shard, "--part", f"{p}/2"] for p in (0, 1)]
            times["parts2"].append(timed(parts))
            one = [
                [str(GIFT), *common, str(outs["parts2_w1"]), *shard, "--workers", "1", "--part", f"{p}/2"]
                for p in (0, 1)
            ]
            times["parts2_w1"].append(timed(one))
            ray_cli = [str(GIFT), *common, str(outs["ray_cli"]), *shard, "--executor", "ray", "--parts", "2"]
            times["ray_cli"].append(timed([ray_cli]))
            start = time.monotonic()
            options = MergeOptions(max_shard_bytes=int(args.shard_size.removesuffix("MB")) * 10**6, quiet=True)
            run_on_ray(load_recipe(recipe), outs["ray_warm"], options, parts=2)
            times["ray_warm"].append(time.monotonic() - start)
            start = time.monotonic()  # Ray's overhead: one part on Ray against the same run in this process
            run_recipe(load_recipe(recipe), outs["inproc_single"], options)
            times["inproc_single"].append(time.monotonic() - start)
            start = time.monotonic()
            run_on_ray(load_recipe(recipe), outs["ray_warm_p1"], options, parts=1)
            times["ray_warm_p1"].append(time.monotonic() - start)
            for kind in kinds[1:]:
                if not same_folders(outs["single"], outs[kind]):
                    raise SystemExit(f"{outs[kind]}: not the bytes of {outs['single']}")
            for out in outs.values():
                shutil.rmtree(out)
            print(name, i, {k: round(v[-1], 2) for k, v in times.items()}, flush=True)
        results[name] = times
    ray.shutdown()
    summary = {
        name: {
            "output_gb": round(sum(f.stat().st_size for f in (work / f"warm-{name}").glob("*.safetensors")) / 1e9, 3),
            **{k: round(statistics.median(v), 2) for k, v in t.items()},
            "all": t,
        }
        for name, t in results.items()
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
