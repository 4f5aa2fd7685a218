"""Check that the redesigned merge engine writes the same bytes as the code before it, on the CPU.

Why: the method-engine redesign (issue #12: every merge method written once over a numpy/torch backend,
``gift_merge/engine/``, ``gift_merge/operators/*``) must not move a single output bit on the CPU. The
unit tests compare engines and chunkings of the *current* code with each other; this script compares the
current code with the last commit before the redesign (``7799254``), recipe by recipe, on the test
fixtures and on the benchmark models.

How:

- the old code is checked out as a detached ``git worktree`` in a temporary folder and run from the same
  virtualenv with ``PYTHONPATH=WORKTREE``; the new code with ``PYTHONPATH=`` a snapshot of this working
  tree (its tracked and untracked files under ``gift_merge/``, ``tests/``, ``benchmarks/``, copied at the
  start and fingerprinted), so that edits made to the working tree while the check runs cannot mix two
  states of the code in one report (``--live`` runs the working tree itself instead). The runs start
  in a folder without a ``gift_merge`` package (``python -m`` puts the working directory first on
  ``sys.path``), and ``python -c 'import gift_merge; print(gift_merge.__file__)'`` is checked for each tree
  before and after the runs;
- inputs are built once, with the new code: the tiny Llama family of the tests
  (``build_family(..., "llama", seed=11, dtype=...)``) in float32, bfloat16 and float16, the Llama adapters
  of ``tests/adapter_variants.py`` on each family's base, and the benchmark models of
  ``benchmarks/make_models.py`` (``--bench-size``, with ``--with-lora``);
- recipes: ``RECIPES`` of ``tests/test_numpy_path.py``, the elementwise and GTA recipes and the trim
  variants (``TIES_VARIANTS`` × methods) and ``GLOBAL_STATISTICS`` of ``tests/test_chunking.py``, ``gift`` and
  ``lora_transfer`` with each adapter at weight 0.7 and 1.0, ``passthrough`` over ``model+adapter``, and
  ``benchmarks/recipes/*.yaml`` (on every tiny family, ``ft1``/``ft2``/``lora`` mapped to ``math``/``code``/the
  plain adapter, and on the benchmark models), each with ``--engine`` left at ``auto`` and with
  ``--engine torch``;
- each case runs ``python -m gift_merge.cli run RECIPE OUT -q`` with old and new code, and the outputs'
  safetensors files are compared: file names, headers (dtypes, shapes, offsets, metadata), then every
  tensor's bytes; a differing float tensor is reported with its count of differing entries and the largest
  difference in units in the last place. Other output files (README, provenance JSON) are reported when
  they differ but do not fail the check.

One line per case; exit status 1 if any case differs or fails. Example::

    .venv/bin/python benchmarks/byte_identity.py                 # everything: ~35 min on a shared 2-core machine
    .venv/bin/python benchmarks/byte_identity.py --bench-size none --only ties
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
OLD_COMMIT = "7799254"
PYTHON = sys.executable
FAMILY_DTYPES = ("float32", "bfloat16", "float16")
ADAPTERS = ("plain", "rslora-patterns", "llama-embedding", "modules-to-save", "dora")
TRIM_METHODS = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
ENGINES = ("auto", "torch")
TENSOR_SUFFIX = ".safetensors"
# Checkpoint files compared byte for byte; every other output file is informational.
STRICT_SUFFIXES = (TENSOR_SUFFIX, ".safetensors.index.json")
FLOAT_BITS = {"F64": np.uint64, "F32": np.uint32, "F16": np.uint16, "BF16": np.uint16}
FLOAT_VALUES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}
ITEM_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class Tree:
    """One version of the code: a label and the folder put on ``PYTHONPATH``."""

    label: str
    root: Path


@dataclass(frozen=True)
class Case:
    """One recipe on one set of inputs with one ``--engine`` choice."""

    name: str
    text: str
    engine: str
    timeout: float = 300.0


@dataclass
class TensorDiff:
    """How one tensor differs between the two outputs."""

    name: str
    dtype: str
    entries: int
    total: int
    max_ulp: int | None = None  # None: not a float tensor, or only NaN/sign-of-zero differences
    nan_mismatch: int = 0

    def describe(self) -> str:
        ulp = "" if self.max_ulp is None else f", max {self.max_ulp} ulp"
        nan = f", {self.nan_mismatch} NaN mismatches" if self.nan_mismatch else ""
        return f"{self.name} [{self.dtype}] {self.entries}/{self.total} entries{ulp}{nan}"


@dataclass
class Outcome:
    """The comparison of one case's two outputs."""

    case: Case
    status: str  # "identical" | "DIFFERENT" | "ERROR"
    detail: str = ""
    tensors: list[TensorDiff] = field(default_factory=list)
    other_files: list[str] = field(default_factory=list)
    engines: tuple[str, str] = ("?", "?")
    seconds: float = 0.0

    def line(self) -> str:
        engines = self.engines[0] if self.engines[0] == self.engines[1] else "→".join(self.engines)
        text = f"{self.status:9s} {self.case.name} --engine {self.case.engine} (ran: {engines}, {self.seconds:.1f} s)"
        if self.tensors:
            entries = sum(t.entries for t in self.tensors)
            ulps = [t.max_ulp for t in self.tensors if t.max_ulp is not None]
            worst = f", max {max(ulps)} ulp" if ulps else ""
            shown = "; ".join(t.describe() for t in sorted(self.tensors, key=lambda t: -t.entries)[:4])
            more = f"; +{len(self.tensors) - 4} more tensors" if len(self.tensors) > 4 else ""
            text += f": {len(self.tensors)} tensors, {entries} entries{worst}: {shown}{more}"
        if self.detail:
            text += f": {self.detail}"
        if self.other_files:
            text += f" [other files differ: {', '.join(self.other_files)}]"
        return text


# ---------------------------------------------------------------------------------------------------------
# Running the two trees


def environment(tree: Tree) -> dict[str, str]:
    """The process environment for one tree: only that tree on ``PYTHONPATH``, offline, quiet."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(tree.root), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return env


def check_import(tree: Tree, cwd: Path) -> str:
    """Fail unless ``import gift_merge`` in ``tree``'s environment finds that tree's package."""
    found = subprocess.run(
        [PYTHON, "-c", "import gift_merge; print(gift_merge.__file__)"],
        cwd=cwd,
        env=environment(tree),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    expected = (tree.root / "gift_merge" / "__init__.py").resolve()
    if Path(found).resolve() != expected:
        raise SystemExit(f"{tree.label}: gift_merge imported from {found}, expected {expected}")
    return found


SNAPSHOT_FOLDERS = ("gift_merge", "tests", "benchmarks")


def tree_files(repo: Path) -> list[str]:
    """The working tree's files that a snapshot copies: tracked and untracked, not ignored, present."""
    listed = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard", *SNAPSHOT_FOLDERS],
        check=True,
        capture_output=True,
    ).stdout.decode()
    return sorted({name for name in listed.split("\0") if name and (repo / name).is_file()})


def fingerprint(root: Path, files: list[str]) -> str:
    """A digest of these files' names and contents under ``root``."""
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def snapshot(repo: Path, dest: Path, attempts: int = 5) -> tuple[list[str], str]:
    """Copy the working tree's code into ``dest``; the files copied and their fingerprint. Retried while
    the working tree changes under the copy (the copy must equal the tree at one instant)."""
    for _ in range(attempts):
        shutil.rmtree(dest, ignore_errors=True)
        files = tree_files(repo)
        for name in files:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, dest / name)
        copied = fingerprint(dest, files)
        if tree_files(repo) == files and fingerprint(repo, files) == copied:
            return files, copied
        time.sleep(5)
    raise SystemExit(f"{repo} kept changing while it was copied; try again")


def merge(tree: Tree, case: Case, recipe: Path, out: Path, cwd: Path) -> str | None:
    """Run the CLI for one case; the error text if it failed (its whole stderr goes next to ``out``)."""
    command = [PYTHON, "-m", "gift_merge.cli", "run", str(recipe), str(out), "-q"]
    if case.engine != "auto":
        command += ["--engine", case.engine]
    try:
        done = subprocess.run(
            command, cwd=cwd, env=environment(tree), capture_output=True, text=True, timeout=case.timeout
        )
    except subprocess.TimeoutExpired:
        return f"{tree.label}: timed out after {case.timeout:.0f} s"
    if done.returncode != 0:
        log = out.with_name(f"{tree.label}.stderr")
        log.write_text(done.stdout + done.stderr)
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return f"{tree.label}: exit {done.returncode}: {tail[0]} (log: {log})"
    return None


# ---------------------------------------------------------------------------------------------------------
# Comparing two outputs


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """A safetensors file's JSON header and the offset where its data starts."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


def same_bytes(a: Path, b: Path, block: int = 1 << 24) -> bool:
    """Whether two files hold the same bytes (read in blocks: checkpoints can be gigabytes)."""
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(block), fb.read(block)
            if x != y:
                return False
            if not x:
                return True


def tensor_bytes(path: Path) -> dict[str, tuple[str, list[int], np.ndarray]]:
    """Every tensor of a safetensors file as (dtype, shape, raw bytes), the bytes memory-mapped."""
    header, start = read_header(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        tensors[name] = (info["dtype"], info["shape"], raw[start + begin : start + end])
    return tensors


def ordered(bits: np.ndarray) -> np.ndarray:
    """Float bit patterns as integers in the order of the values they encode (±0 both map to 0), so the
    difference of two is the distance in units in the last place."""
    width = bits.dtype.itemsize * 8
    wide = bits.astype(np.uint64) if width < 64 else bits
    sign = np.uint64(1) << np.uint64(width - 1)
    magnitude = (wide & (sign - np.uint64(1))).astype(np.int64)
    return np.where((wide & sign) != 0, -magnitude, magnitude)


def diff_tensor(name: str, dtype: str, a: np.ndarray, b: np.ndarray) -> TensorDiff | None:
    """How two tensors' raw bytes differ; None if they are the same."""
    if np.array_equal(a, b):
        return None
    if dtype in FLOAT_BITS:
        bits_a, bits_b = a.view(FLOAT_BITS[dtype]), b.view(FLOAT_BITS[dtype])
        differ = bits_a != bits_b
        oa, ob = ordered(bits_a[differ]), ordered(bits_b[differ])
        if dtype == "BF16":
            nan_a = (bits_a[differ] & 0x7FFF) > 0x7F80
            nan_b = (bits_b[differ] & 0x7FFF) > 0x7F80
        else:
            nan_a = np.isnan(bits_a[differ].view(FLOAT_VALUES[dtype]))
            nan_b = np.isnan(bits_b[differ].view(FLOAT_VALUES[dtype]))
        numeric = ~(nan_a | nan_b)
        gaps = np.abs(oa[numeric] - ob[numeric])
        max_ulp = int(gaps.max()) if gaps.size and gaps.max() > 0 else None
        total = bits_a.size
        return TensorDiff(name, dtype, int(differ.sum()), total, max_ulp, int((~numeric).sum()))
    size = ITEM_SIZE.get(dtype, 1)
    entries = a.reshape(-1, size) != b.reshape(-1, size)
    return TensorDiff(name, dtype, int(entries.any(axis=1).sum()), a.size // size)


def compare_outputs(old: Path, new: Path) -> tuple[str, list[TensorDiff], list[str]]:
    """(problem with the file layout or headers, differing tensors, differing informational files)."""
    files_old = {p.name for p in old.iterdir() if p.is_file()}
    files_new = {p.name for p in new.iterdir() if p.is_file()}
    strict = sorted(n for n in files_old | files_new if n.endswith(STRICT_SUFFIXES))
    other = sorted(
        n
        for n in files_old | files_new
        if not n.endswith(STRICT_SUFFIXES) and (n not in files_old & files_new or not same_bytes(old / n, new / n))
    )
    missing = [n for n in strict if n not in files_old & files_new]
    if missing:
        return f"checkpoint files only on one side: {missing}", [], other
    problems: list[str] = []
    diffs: list[TensorDiff] = []
    for name in strict:
        if same_bytes(old / name, new / name):
            continue
        if not name.endswith(TENSOR_SUFFIX):
            problems.append(f"{name} differs")
            continue
        header_old, _ = read_header(old / name)
        header_new, _ = read_header(new / name)
        if header_old != header_new:
            problems.append(f"{name}: headers differ")
        if header_old.get("__metadata__") != header_new.get("__metadata__"):
            problems.append(f"{name}: metadata {header_old.get('__metadata__')} vs {header_new.get('__metadata__')}")
        tensors_old, tensors_new = tensor_bytes(old / name), tensor_bytes(new / name)
        if set(tensors_old) != set(tensors_new):
            problems.append(f"{name}: tensor names differ ({sorted(set(tensors_old) ^ set(tensors_new))[:5]})")
        for tensor in sorted(set(tensors_old) & set(tensors_new)):
            (dtype_a, shape_a, a), (dtype_b, shape_b, b) = tensors_old[tensor], tensors_new[tensor]
            if (dtype_a, shape_a) != (dtype_b, shape_b):
                problems.append(f"{tensor}: {dtype_a}{shape_a} vs {dtype_b}{shape_b}")
            elif found := diff_tensor(tensor, dtype_a, a, b):
                diffs.append(found)
    return "; ".join(problems), diffs, other


def engine_used(out: Path) -> str:
    """The engine the run recorded in its provenance file."""
    try:
        return str(json.loads((out / "gift_merge.json").read_text()).get("engine", "?"))
    except (OSError, ValueError):
        return "?"


def run_case(case: Case, trees: tuple[Tree, Tree], work: Path, keep: bool) -> Outcome:
    """Run one case with both trees and compare the outputs."""
    start = time.perf_counter()
    folder = work / "cases" / case.name.replace("/", "__") / case.engine
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / "recipe.yaml"
    recipe.write_text(case.text)
    outs = [folder / tree.label for tree in trees]
    for out in outs:
        shutil.rmtree(out, ignore_errors=True)
    errors = [e for tree, out in zip(trees, outs, strict=True) if (e := merge(tree, case, recipe, out, work))]
    outcome = Outcome(case, "ERROR", engines=(engine_used(outs[0]), engine_used(outs[1])))
    if errors:
        outcome.detail = " | ".join(errors)
    else:
        problem, outcome.tensors, outcome.other_files = compare_outputs(*outs)
        outcome.detail = problem
        outcome.status = "DIFFERENT" if problem or outcome.tensors else "identical"
    if outcome.status == "identical" or not keep:
        for out in outs:
            shutil.rmtree(out, ignore_errors=True)
    outcome.seconds = time.perf_counter() - start
    return outcome


# ---------------------------------------------------------------------------------------------------------
# Inputs and recipes


def build_inputs(root: Path, new: Path) -> dict[str, dict[str, Path]]:
    """The tiny Llama families and their adapters, with the new code (``new`` first on ``sys.path``):
    ``{dtype: {role: path}}``, adapters under the roles ``adapter:NAME``."""
    import warnings

    import torch

    import gift_merge
    from gift_merge.hf_quiet import quiet_transformers
    from gift_merge.toy.tiny_models import build_family
    from tests.adapter_variants import VARIANTS, make_adapter

    if Path(gift_merge.__file__).resolve().parent != (new / "gift_merge").resolve():
        raise SystemExit(f"inputs must be built with the new code, not {gift_merge.__file__}")
    inputs: dict[str, dict[str, Path]] = {}
    with quiet_transformers(logs=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's and transformers' deprecation notes
        for dtype in FAMILY_DTYPES:
            family = build_family(root / dtype, "llama", seed=11, dtype=getattr(torch, dtype))
            for seed, (name, (arch, lora)) in enumerate(VARIANTS.items()):  # the seeds tests/conftest.py uses
                if name in ADAPTERS and arch == "llama":
                    adapter = make_adapter(family["base"], root / dtype / name, seed=seed, **lora)
                    family[f"adapter:{name}"] = adapter
            inputs[dtype] = family
    return inputs


def build_bench_models(size: str, out: Path, new: Path) -> Path:
    """``benchmarks/make_models.py --size SIZE --with-lora`` of the new tree into ``out``."""
    subprocess.run(
        [PYTHON, str(new / "benchmarks" / "make_models.py"), "--size", size, "--with-lora", "--out", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return out


def bench_recipes(models: dict[str, Path]) -> Iterator[tuple[str, str]]:
    """``benchmarks/recipes/*.yaml`` of the new tree with ``${MODELS}/ROLE`` replaced by ``models[ROLE]``."""
    import tests

    for path in sorted((Path(tests.__file__).parent.parent / "benchmarks" / "recipes").glob("*.yaml")):
        text = path.read_text()
        for role in sorted(models, key=len, reverse=True):
            text = text.replace(f"${{MODELS}}/{role}", str(models[role]))
        if any("${MODELS}" in line for line in text.splitlines() if not line.lstrip().startswith("#")):
            raise SystemExit(f"{path.name}: unmapped model in {text}")
        yield path.stem, text


def family_recipes(family: dict[str, Path]) -> Iterator[tuple[str, str]]:
    """Every test recipe on one tiny family: (name, recipe text)."""
    from tests.test_chunking import GLOBAL_STATISTICS, GTA, TIES_VARIANTS
    from tests.test_chunking import RECIPES as CHUNK_RECIPES
    from tests.test_numpy_path import RECIPES

    paths = {role: path for role, path in family.items() if not role.startswith("adapter:")}
    adapters = {role.removeprefix("adapter:"): path for role, path in family.items() if role.startswith("adapter:")}
    for name, text in RECIPES.items():
        yield f"numpy_path/{name}", text.format(**paths)
    for name, text in CHUNK_RECIPES.items():
        yield f"chunking/{name}", text.format(**paths)
    for method in ("ties", "dare_ties", "breadcrumbs_ties", "della"):
        yield f"chunking-gta/{method}", GTA.format(method=method, **paths)
    for variant, params in TIES_VARIANTS.items():  # as test_streamed_trims_are_bit_identical writes them
        first, *rest = params.split("\n")
        for method in TRIM_METHODS:
            if method.startswith("della") and variant == "tiny-density":
                continue  # della needs density ≥ epsilon (the test skips it too)
            text = (
                f"merge_method: {method}\nbase_model: {{base}}\nmodels:\n"
                f"  - {{{{model: {{math}}, parameters: {first}}}}}\n"
                "  - {{model: {code}, parameters: {{weight: 0.5, density: 1.0}}}}\n"
                f"dtype: bfloat16\n{chr(10).join(rest)}\n"
            )
            yield f"trim/{method}/{variant}", text.format(**paths)
    for name, text in GLOBAL_STATISTICS.items():
        yield f"global/{name}", text.format(**paths)
    for adapter, path in adapters.items():
        for method in ("gift", "lora_transfer"):
            for weight in (0.7, 1.0):
                yield (
                    f"{method}/{adapter}/w{weight}",
                    f"merge_method: {method}\nbase_model: {paths['instruct']}\nmodels:\n"
                    f"  - model: {path}\n    parameters: {{weight: {weight}}}\n",
                )
        yield (
            f"model+adapter/{adapter}",
            f"merge_method: passthrough\nmodels:\n  - model: {paths['instruct']}+{path}\n",
        )
    roles = {**paths, "ft1": paths["math"], "ft2": paths["code"], "lora": adapters["plain"]}
    for name, text in bench_recipes(roles):
        yield f"bench-recipe/{name}", text


def all_cases(inputs: dict[str, dict[str, Path]], bench: Path | None) -> list[Case]:
    """Every (recipe, inputs, engine) case, tiny families first."""
    cases = [
        Case(f"{dtype}/{name}", text, engine)
        for dtype, family in inputs.items()
        for name, text in family_recipes(family)
        for engine in ENGINES
    ]
    if bench is not None:
        roles = {role: bench / role for role in ("base", "instruct", "ft1", "ft2", "lora")}
        cases += [
            Case(f"bench-{bench.name}/{name}", text, engine, timeout=1800.0)
            for name, text in bench_recipes(roles)
            for engine in ENGINES
        ]
    return cases


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Build inputs, run every case with old and new code, print one line per case."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default=OLD_COMMIT, help="the commit to compare with [%(default)s]")
    parser.add_argument("--work", type=Path, help="folder for inputs and outputs [a new one under /tmp]")
    parser.add_argument(
        "--bench-size",
        default="small",
        help="make_models.py size of the benchmark models, or 'none' to skip them [%(default)s]",
    )
    parser.add_argument("--bench-models", type=Path, help="use these make_models.py models (with lora/) instead")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    parser.add_argument("--jobs", type=int, default=2, help="tiny-family cases run concurrently [%(default)s]")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and differing outputs")
    parser.add_argument("--live", action="store_true", help="run the working tree itself, not a snapshot of it")
    parser.add_argument("--report", type=Path, help="also write every case's result to this JSON file")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="gift-byte-identity-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    new = REPO_ROOT
    copied: tuple[list[str], str] | None = None
    if not args.live:
        new = work / "new-tree"
        copied = snapshot(REPO_ROOT, new)
        print(f"new: snapshot of {REPO_ROOT} at {time.strftime('%H:%M:%S')}, fingerprint {copied[1]}", flush=True)
    sys.path.insert(0, str(new))  # tests.* and the new gift_merge, for building inputs and reading recipes
    worktree = work / "old-tree"
    subprocess.run(
        ["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", str(worktree), args.old],
        check=True,
        capture_output=True,
    )
    trees = (Tree("old", worktree), Tree("new", new))
    try:
        for tree in trees:
            print(f"{tree.label}: {check_import(tree, work)}", flush=True)
        started = time.perf_counter()
        inputs = build_inputs(work / "families", new)
        bench: Path | None = None
        if args.bench_models:
            bench = args.bench_models.resolve()
        elif args.bench_size != "none":
            bench = build_bench_models(args.bench_size, work / args.bench_size, new)
        print(f"inputs built in {time.perf_counter() - started:.0f} s", flush=True)

        cases = [c for c in all_cases(inputs, bench) if args.only in c.name]
        print(f"{len(cases)} cases (recipe × inputs × engine)", flush=True)
        outcomes: list[Outcome] = []

        def record(outcome: Outcome) -> None:
            outcomes.append(outcome)
            print(outcome.line(), flush=True)

        tiny = [c for c in cases if not c.name.startswith("bench-")]
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            for outcome in pool.map(lambda c: run_case(c, trees, work, args.keep), tiny):
                record(outcome)
        for case in cases[len(tiny) :]:  # gigabyte models: one at a time
            record(run_case(case, trees, work, args.keep))

        for tree in trees:  # nothing changed which tree each environment imports
            check_import(tree, work)
        if copied and (tree_files(REPO_ROOT) != copied[0] or fingerprint(REPO_ROOT, copied[0]) != copied[1]):
            print(f"note: {REPO_ROOT} changed while this ran; the results are for the snapshot", flush=True)
        bad = [o for o in outcomes if o.status != "identical"]
        print(
            f"\n{len(outcomes)} cases: {len(outcomes) - len(bad)} identical, "
            f"{sum(o.status == 'DIFFERENT' for o in bad)} different, {sum(o.status == 'ERROR' for o in bad)} errors "
            f"({time.perf_counter() - started:.0f} s)"
        )
        for outcome in bad:
            print(outcome.line())
        if args.report:
            args.report.write_text(
                json.dumps(
                    [
                        {
                            "case": o.case.name,
                            "engine": o.case.engine,
                            "status": o.status,
                            "ran": o.engines,
                            "detail": o.detail,
                            "tensors": [t.__dict__ for t in o.tensors],
                            "other_files": o.other_files,
                        }
                        for o in outcomes
                    ],
                    indent=1,
                )
                + "\n"
            )
        return 1 if bad else 0
    finally:
        subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(worktree)], check=False)
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
