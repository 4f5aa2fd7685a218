"""Benchmark gift-merge against mergekit: wall time and memory per recipe, next to the I/O floor.

Why this shape: a merge is mostly "read N models, write one", so the honest yardstick is the time it
takes just to read every input byte and write the output once on the same machine, in the same session
(the *I/O floor*). Each recipe runs N times per tool, the tools alternating so drift (another job on the
box, page-cache churn) hits both alike; the page cache is warmed first so the runs compare compute and
I/O strategy, not cold disk reads. Memory is the peak over the whole process tree (see procmon.py).

Example::

    python benchmarks/run.py --size small --methods ties,linear --runs 3 --output results.md
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from procmon import RunResult, run_monitored

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
RECIPES = HERE / "recipes"
CHUNK = 16 * 1024 * 1024
GIB = 1024**3
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}
ALL_TOOLS = ("mergekit", "gift-merge")


@dataclass
class Recipe:
    """One benchmark recipe, with ${MODELS} substituted."""

    name: str
    path: Path  # the materialised copy that the tools read
    method: str
    tools: list[str]
    random: bool
    inputs: list[Path]  # model and adapter folders the recipe reads
    uses_lora_ref: bool


@dataclass
class Run:
    """One measured run of one tool on one recipe."""

    recipe: str
    tool: str
    index: int
    ok: bool
    wall_s: float = 0.0
    cpu_s: float = 0.0
    load1: float = 0.0  # 1-minute load average when the run started: context for noisy timings
    peak_rss_bytes: int = 0
    peak_anon_bytes: int = 0  # summed RssAnon: pages forked workers share with their parent count once each
    peak_pss_anon_bytes: int = 0  # summed Pss_Anon: the anonymous memory the process tree really holds
    max_rss_kernel_bytes: int = 0
    output_bytes: int = 0
    error: str = ""


@dataclass
class Floor:
    """One I/O-floor measurement: read the recipe's inputs once, write its output size once."""

    recipe: str
    input_bytes: int
    output_bytes: int
    read_s: float
    write_s: float

    @property
    def total_s(self) -> float:
        return self.read_s + self.write_s


@dataclass
class Session:
    """Everything measured, for the Markdown report and the JSON dump."""

    machine: dict[str, str]
    versions: dict[str, str]
    args: dict[str, Any]
    startup: dict[str, list[float]] = field(default_factory=dict)
    startup_errors: dict[str, str] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    floors: list[Floor] = field(default_factory=list)
    warmup_s: float = 0.0


# ---------------------------------------------------------------- recipes


def model_refs(doc: dict[str, Any]) -> list[str]:
    """Every model reference string in a mergekit-style recipe (base_model, models, slices)."""
    refs: list[str] = []
    if isinstance(doc.get("base_model"), str):
        refs.append(doc["base_model"])
    for entry in doc.get("models") or []:
        refs.append(entry["model"] if isinstance(entry, dict) else entry)
    for sl in doc.get("slices") or []:
        refs += [src["model"] for src in sl.get("sources", [])]
    return [r for r in refs if isinstance(r, str)]


def load_recipe(src: Path, models: Path, dest_dir: Path) -> Recipe:
    """Substitute ${MODELS}, write the result to ``dest_dir`` and read the ``# tools:`` header."""
    text = src.read_text().replace("${MODELS}", str(models))
    header = {m.group(1): m.group(2).strip() for m in re.finditer(r"^#\s*(tools|random):(.*)$", text, re.M)}
    doc = yaml.safe_load(text)
    refs = model_refs(doc)
    inputs: list[Path] = []
    for ref in refs:
        for part in ref.split("+"):
            p = Path(part)
            if p not in inputs:
                inputs.append(p)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / src.name
    dest.write_text(text)
    method = str(doc.get("merge_method", "?"))
    return Recipe(
        name=src.stem,
        path=dest,
        method=method,
        tools=[t.strip() for t in header.get("tools", ",".join(ALL_TOOLS)).split(",") if t.strip()],
        random=header.get("random", "").lower() == "true" or method in RANDOM_METHODS,
        inputs=inputs,
        uses_lora_ref=any("+" in r for r in refs),
    )


def input_files(recipe: Recipe) -> list[Path]:
    """All files under the recipe's input folders (missing folders are skipped; the tool will fail)."""
    return sorted(f for d in recipe.inputs if d.is_dir() for f in d.rglob("*") if f.is_file())


def dir_bytes(path: Path) -> int:
    """Total size of the regular files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


# ---------------------------------------------------------------- I/O floor


def read_all(files: list[Path]) -> float:
    """Read every byte of ``files`` once in 16 MiB chunks into one buffer; return seconds."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - t0


def write_bytes(path: Path, nbytes: int) -> float:
    """Write ``nbytes`` to a new file and close it without fsync, as the tools do; return seconds."""
    buf = os.urandom(CHUNK)  # random, in case the filesystem compresses or dedups zeros
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        left = nbytes
        while left > 0:
            left -= fh.write(buf[: min(left, CHUNK)])
    elapsed = time.perf_counter() - t0
    path.unlink()
    return elapsed


# ---------------------------------------------------------------- tools


def tool_command(tool: str, recipe: Recipe, out: Path, args: argparse.Namespace, work: Path) -> list[str]:
    """The command line for one run; default options except what each tool needs to run at all."""
    if tool == "mergekit":
        cmd = [str(args.mergekit), str(recipe.path), str(out), "--copy-tokenizer"]
        if recipe.random:
            cmd += ["--random-seed", "0"]
        if recipe.uses_lora_ref:  # mergekit refuses `model+lora` without a cache folder
            cmd += ["--lora-merge-cache", str(work / "lora-cache")]
        return cmd
    cmd = [str(args.gift_merge), "run", str(recipe.path), str(out), "--overwrite", "--quiet"]
    return cmd + args.gift_merge_arg


def tool_binary(tool: str, args: argparse.Namespace) -> Path:
    """Executable of a tool."""
    return Path(args.mergekit if tool == "mergekit" else args.gift_merge)


def tail(path: Path, lines: int = 6) -> str:
    """Last lines of a log, squashed onto one line for the report."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])[-600:]


def measure_startup(tools: list[str], args: argparse.Namespace, session: Session, env: dict[str, str]) -> None:
    """Wall time of ``TOOL --help``: the import cost every invocation pays."""
    for tool in tools:
        exe = tool_binary(tool, args)
        if not exe.exists():
            session.startup_errors[tool] = f"not installed ({exe})"
            continue
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            proc = subprocess.run([str(exe), "--help"], capture_output=True, env=env, check=False)
            times.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                session.startup_errors[tool] = proc.stderr.decode(errors="replace").strip()[-300:]
                break
        session.startup[tool] = times


def run_one(tool: str, recipe: Recipe, idx: int, args: argparse.Namespace, work: Path, env: dict[str, str]) -> Run:
    """One monitored run; failures are recorded, never raised."""
    exe = tool_binary(tool, args)
    if not exe.exists():
        return Run(recipe.name, tool, idx, ok=False, error=f"not installed ({exe})")
    out = work / "out" / args.size / recipe.name / tool
    shutil.rmtree(out, ignore_errors=True)  # not timed; mergekit would otherwise merge into stale files
    shutil.rmtree(work / "lora-cache", ignore_errors=True)  # make mergekit redo its LoRA merge each run
    out.parent.mkdir(parents=True, exist_ok=True)
    log = work / "logs" / args.size / f"{recipe.name}-{tool}-{idx}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = tool_command(tool, recipe, out, args, work)
    load1 = os.getloadavg()[0]
    res: RunResult = run_monitored(cmd, log_path=log, env=env, interval=args.sample_ms / 1000, timeout=args.timeout)
    run = Run(
        recipe.name,
        tool,
        idx,
        ok=res.returncode == 0,
        wall_s=res.wall_s,
        cpu_s=res.cpu_s,
        load1=load1,
        peak_rss_bytes=res.peak_rss_bytes,
        peak_anon_bytes=res.peak_anon_bytes,
        peak_pss_anon_bytes=res.peak_pss_anon_bytes,
        max_rss_kernel_bytes=res.max_rss_kernel_bytes,
        output_bytes=dir_bytes(out),
    )
    if not run.ok:
        run.error = f"exit {res.returncode}: {tail(log)}"
    if not args.keep_outputs and idx < args.runs - 1:
        shutil.rmtree(out, ignore_errors=True)
    return run


# ---------------------------------------------------------------- report


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt(x: float, spec: str = ".2f") -> str:
    return "–" if x != x else format(x, spec)  # NaN -> dash


def report(session: Session, recipes: list[Recipe], title: str) -> str:
    """The Markdown report: machine, versions, start-up, results table, I/O floors, errors."""
    m, v = session.machine, session.versions
    lines = [f"## {title}", ""]
    lines += [f"- date: {m['date']}", f"- machine: {m['cpu']}, nproc {m['nproc']}, kernel {m['kernel']}"]
    lines += ["- `free -g`:", "", "```", m["free"], "```", ""]
    lines += ["- versions: " + ", ".join(f"{k} {val}" for k, val in v.items())]
    a = session.args
    lines += [
        f"- models: `{a['size']}` ({a['models']}), {a['runs']} run(s) per tool, tools alternating, "
        f"page cache warmed first ({session.warmup_s:.1f} s), memory sampled every {a['sample_ms']} ms "
        "over the whole process tree",
        "",
    ]
    if session.startup or session.startup_errors:
        lines += ["Start-up (`TOOL --help`, wall):", "", "| tool | median s | runs |", "|---|---|---|"]
        for tool, ts in session.startup.items():
            lines.append(f"| {tool} | {fmt(median(ts))} | {', '.join(fmt(t) for t in ts)} |")
        for tool, err in session.startup_errors.items():
            lines.append(f"| {tool} | failed: {err} | |")
        lines.append("")

    floors = {r.name: [f for f in session.floors if f.recipe == r.name] for r in recipes}
    lines += [
        "| recipe | tool | median wall s | median CPU s | median peak RSS GiB | median peak RssAnon GiB "
        "| median peak Pss_Anon GiB | input GB/s | ratio to mergekit | ratio to I/O floor | runs ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recipes:
        fl = floors[r.name]
        floor_s = median([f.total_s for f in fl])
        in_bytes = fl[0].input_bytes if fl else sum(f.stat().st_size for f in input_files(r))
        mk = [x.wall_s for x in session.runs if x.recipe == r.name and x.tool == "mergekit" and x.ok]
        for tool in [t for t in session.args["tools"] if t in r.tools]:
            runs = [x for x in session.runs if x.recipe == r.name and x.tool == tool]
            ok = [x for x in runs if x.ok]
            if not runs:  # a report written mid-session: this recipe's turn has not come yet
                lines.append(f"| {r.name} | {tool} | not run yet | | | | | | | | |")
                continue
            if not ok:
                err = runs[0].error
                lines.append(f"| {r.name} | {tool} | failed: {err.replace('|', '/')} | | | | | | | | 0/{len(runs)} |")
                continue
            wall = median([x.wall_s for x in ok])
            lines.append(
                f"| {r.name} | {tool} | {fmt(wall)} | {fmt(median([x.cpu_s for x in ok]))} "
                f"| {fmt(median([x.peak_rss_bytes / GIB for x in ok]))} "
                f"| {fmt(median([x.peak_anon_bytes / GIB for x in ok]))} "
                f"| {fmt(median([x.peak_pss_anon_bytes / GIB for x in ok]))} | {fmt(in_bytes / 1e9 / wall)} "
                f"| {fmt(wall / median(mk)) if mk else '–'} | {fmt(wall / floor_s, '.1f')} | {len(ok)}/{len(runs)} |"
            )
    lines += [
        "",
        "I/O floor (same session, warm cache: read every input byte once + write the output size once, no fsync):",
        "",
        "| recipe | input GB | output GB | read s | write s | floor s |",
        "|---|---|---|---|---|---|",
    ]
    for r in recipes:
        fl = floors[r.name]
        if fl:
            lines.append(
                f"| {r.name} | {fl[0].input_bytes / 1e9:.2f} | {fl[0].output_bytes / 1e9:.2f} "
                f"| {fmt(median([f.read_s for f in fl]))} | {fmt(median([f.write_s for f in fl]))} "
                f"| {fmt(median([f.total_s for f in fl]))} |"
            )
    per_run = [x for x in session.runs if x.ok]
    if per_run:
        lines += [
            "",
            "<details><summary>every run</summary>",
            "",
            "| recipe | tool | # | wall s | CPU s | load avg at start | peak RSS GiB | peak RssAnon GiB "
            "| peak Pss_Anon GiB | ru_maxrss GiB | output GB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {x.recipe} | {x.tool} | {x.index} | {x.wall_s:.2f} | {x.cpu_s:.1f} | {x.load1:.1f} "
            f"| {x.peak_rss_bytes / GIB:.2f} "
            f"| {x.peak_anon_bytes / GIB:.2f} | {x.peak_pss_anon_bytes / GIB:.2f} | {x.max_rss_kernel_bytes / GIB:.2f} "
            f"| {x.output_bytes / 1e9:.2f} |"
            for x in per_run
        ]
        lines += ["", "</details>"]
    errors = [x for x in session.runs if not x.ok]
    if errors:
        lines += ["", "Failures:", ""] + [f"- {x.recipe} / {x.tool} #{x.index}: {x.error}" for x in errors]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- environment


def sh(cmd: list[str]) -> str:
    """Output of a command, or its error, never raising."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    except OSError as exc:
        return f"({exc})"


def machine_info() -> dict[str, str]:
    """nproc, free -g, CPU model, kernel and date: the context the numbers need."""
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": sh(["nproc"]),
        "free": sh(["free", "-g"]),
        "cpu": cpu,
        "kernel": platform.release(),
    }


def venv_versions(python: Path, packages: list[str]) -> dict[str, str]:
    """Installed versions of ``packages`` in the venv of ``python``."""
    code = (
        "import importlib.metadata as m, json, sys\nout = {}\nfor p in sys.argv[1:]:\n"
        "    try: out[p] = m.version(p)\n    except m.PackageNotFoundError: out[p] = 'not installed'\n"
        "print(json.dumps(out))"
    )
    if not python.exists():
        return {p: "not installed" for p in packages}
    try:
        return json.loads(sh([str(python), "-c", code, *packages]))
    except json.JSONDecodeError:
        return {p: "?" for p in packages}


def versions(args: argparse.Namespace) -> dict[str, str]:
    """Versions of both tools and of the libraries that decide their speed."""
    mk = venv_versions(Path(args.mergekit).parent / "python", ["mergekit", "torch", "transformers", "safetensors"])
    gm = venv_versions(Path(args.gift_merge).parent / "python", ["gift-merge", "torch", "safetensors"])
    out = {"python": platform.python_version(), "mergekit": mk["mergekit"], "gift-merge": gm["gift-merge"]}
    out |= {f"{k} (mergekit venv)": val for k, val in mk.items() if k != "mergekit"}
    out |= {f"{k} (gift-merge venv)": val for k, val in gm.items() if k != "gift-merge"}
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    work_default = REPO_ROOT / "bench-work"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", help="comma-separated recipe names (file stems in benchmarks/recipes); default all")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--tools", default="mergekit,gift-merge")
    p.add_argument("--size", default="small", help="models from bench-work/models/SIZE (make_models.py)")
    p.add_argument("--output", type=Path, help="Markdown report (default bench-work/results-SIZE.md)")
    p.add_argument("--title", default="gift-merge vs mergekit")
    p.add_argument("--work", type=Path, default=work_default)
    p.add_argument("--mergekit", type=Path, default=work_default / "mergekit-venv/bin/mergekit-yaml")
    p.add_argument("--gift-merge", type=Path, default=REPO_ROOT / ".venv/bin/gift-merge")
    p.add_argument("--gift-merge-arg", action="append", default=[], help="extra argument for gift-merge run")
    p.add_argument("--sample-ms", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before a run is killed")
    p.add_argument("--keep-outputs", action="store_true", help="keep every run's output (default: the last)")
    p.add_argument("--no-startup", action="store_true", help="skip the --help start-up measurement")
    args = p.parse_args(argv)

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if bad := [t for t in tools if t not in ALL_TOOLS]:
        p.error(f"unknown tool(s) {bad}; choose from {ALL_TOOLS}")
    work: Path = args.work.resolve()
    models = work / "models" / args.size
    if not models.is_dir():
        p.error(f"{models} not found: run  python benchmarks/make_models.py --size {args.size} --with-lora")
    names = (
        [n.strip() for n in args.methods.split(",")] if args.methods else sorted(f.stem for f in RECIPES.glob("*.yaml"))
    )
    if missing := [n for n in names if not (RECIPES / f"{n}.yaml").exists()]:
        p.error(f"no recipe {missing} in {RECIPES}")
    recipes = [load_recipe(RECIPES / f"{n}.yaml", models, work / "recipes" / args.size) for n in names]
    for r in [r for r in recipes if not set(r.tools) & set(tools)]:
        print(f"skipping {r.name}: only for {', '.join(r.tools)}", flush=True)
    recipes = [r for r in recipes if set(r.tools) & set(tools)]
    names = [r.name for r in recipes]
    output: Path = args.output or work / f"results-{args.size}.md"

    # Two sessions at once would share output folders and halve each other's CPU: refuse the second.
    work.mkdir(parents=True, exist_ok=True)
    lock = open(work / "run.lock", "w")  # noqa: SIM115 - held open (locked) until the process exits
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        p.error(f"another benchmarks/run.py holds {work / 'run.lock'}; wait for it to finish")

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    session = Session(
        machine_info(),
        versions(args),
        {
            "size": args.size,
            "models": str(models),
            "runs": args.runs,
            "tools": tools,
            "methods": names,
            "sample_ms": args.sample_ms,
        },
    )
    if not args.no_startup:
        measure_startup(tools, args, session, env)
        print(f"start-up: { {t: round(median(ts), 2) for t, ts in session.startup.items()} }", flush=True)

    all_inputs = sorted({f for r in recipes for f in input_files(r)})
    session.warmup_s = read_all(all_inputs)
    print(
        f"warmed page cache: {sum(f.stat().st_size for f in all_inputs) / 1e9:.2f} GB in {session.warmup_s:.1f} s",
        flush=True,
    )

    for recipe in recipes:
        applicable = [t for t in tools if t in recipe.tools]
        files = input_files(recipe)
        in_bytes = sum(f.stat().st_size for f in files)
        for idx in range(args.runs):
            order = applicable if idx % 2 == 0 else applicable[::-1]  # alternate who goes first
            for tool in order:
                run = run_one(tool, recipe, idx, args, work, env)
                session.runs.append(run)
                status = (
                    f"{run.wall_s:.1f} s, RSS {run.peak_rss_bytes / GIB:.2f} GiB, "
                    f"anon {run.peak_anon_bytes / GIB:.2f} GiB, Pss_Anon {run.peak_pss_anon_bytes / GIB:.2f} GiB"
                    if run.ok
                    else run.error
                )
                print(f"{recipe.name} {tool} #{idx}: {status}", flush=True)
            outs = [x.output_bytes for x in session.runs if x.recipe == recipe.name and x.ok]
            out_bytes = outs[0] if outs else dir_bytes(recipe.inputs[0])  # all tools write ~ one model
            floor = Floor(
                recipe.name, in_bytes, out_bytes, read_all(files), write_bytes(work / "io-floor.tmp", out_bytes)
            )
            session.floors.append(floor)
            print(
                f"{recipe.name} I/O floor #{idx}: read {floor.read_s:.2f} s + write {floor.write_s:.2f} s", flush=True
            )
        # Write after every recipe so a long session that is cut short still leaves its numbers.
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(report(session, recipes, args.title))
        output.with_suffix(".json").write_text(
            json.dumps(
                {**asdict(session), "floors": [asdict(f) | {"total_s": f.total_s} for f in session.floors]}, indent=2
            )
            + "\n"
        )
    print(f"\nwrote {output} and {output.with_suffix('.json')}\n")
    print(report(session, recipes, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
