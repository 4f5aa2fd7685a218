"""mergekit parity: the merge methods gift-merge shares with mergekit, run by both tools, compared tensor by tensor.

Usage::

    .venv/bin/python benchmarks/mergekit_parity.py                     # every case, ~12 min on a shared 2-core machine
    .venv/bin/python benchmarks/mergekit_parity.py --only arcee,ram    # the cases whose name contains a substring
    .venv/bin/python benchmarks/mergekit_parity.py --mergekit PATH/TO/mergekit-yaml --workdir DIR

Needs mergekit (``bash benchmarks/setup_mergekit.sh`` puts 0.1.5 in ``bench-work/mergekit-venv``), so it is not
part of CI. Prints one Markdown table row per case and exits 1 if a deterministic case differs beyond its
tolerance or a tool fails on one.

What runs: a tiny float32 Llama family (``gift_merge.toy.tiny_models.build_family``, seed 3: ``base`` and the
fine-tunes ``instruct``, ``math``, ``code``, each the base plus 1e-3·N(0, 1) on weights of σ 0.02) and one more
fine-tune ``wide`` (the base plus 1e-2·N(0, 1)), built once in ``--workdir``. Each case is one mergekit YAML
file, run as ``mergekit-yaml RECIPE OUT --random-seed 0`` on the CPU and as ``gift-merge run RECIPE OUT``; the
same file serves both. Every output tensor is compared: its name, dtype and shape, whether its bytes are
equal, how many entries differ and the largest absolute difference.

Verdicts (the tolerances):
- ``exact`` cases (every deterministic method): every tensor within 1e-5 · max(1, max |θ_mergekit|) of
  mergekit's, entry by entry: the rounding of sums taken in another order, well below the 1e-3 changes merged.
- ``flips`` (``arcee_fusion`` in float32): every differing entry is a mask flip, θ_b on one side and
  θ_b + δ on the other. mergekit evaluates the KL of two nearly equal softmaxes in float32, where it is
  mostly rounding error; gift-merge in float64 (see gift_merge/operators/arcee_fusion.py). The flips are
  counted against the entries mergekit keeps; the float64 case (``dtype: float64``, both tools computing in
  float64) is held to ``exact``.
- ``dtype`` (``arcee_fusion`` with ``dtype: bfloat16``): mergekit writes float32 tensors (its issue #604),
  gift-merge the recipe's bfloat16; the values are compared as float32, for the record, never failing.
- ``random`` (DARE, DELLA below density 1): the masks come from different generators (torch's mt19937 in
  mergekit, PCG64DXSM in gift-merge), so the tensors differ by design; listed for the record, never failing.
  The same methods at density 1 draw nothing and are ``exact`` cases.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5
"""Largest |θ_gift-merge − θ_mergekit| of an ``exact`` case, relative to max(1, max |θ_mergekit|) of the tensor."""

THREE = """models:
  - model: {math}
    parameters: {{weight: 0.5{extra}}}
  - model: {code}
    parameters: {{weight: 0.3{extra}}}
  - model: {instruct}
    parameters: {{weight: 0.2{extra}}}
"""


def gta(method: str, extra: str, parameters: str = "") -> str:
    body = f"merge_method: {method}\nbase_model: {{base}}\n" + THREE.replace("{extra}", extra)
    return body + (f"parameters: {{{{{parameters}}}}}\n" if parameters else "") + "dtype: float32\n"


def plain(method: str, models: tuple[str, ...], base: bool, parameters: str = "", extra: str = "") -> str:
    text = f"merge_method: {method}\n" + ("base_model: {base}\n" if base else "") + "models:\n"
    text += "".join(f"  - model: {{{m}}}\n" for m in models)
    return text + (f"parameters: {{{{{parameters}}}}}\n" if parameters else "") + "dtype: float32\n" + extra


@dataclass(frozen=True)
class Case:
    name: str
    recipe: str
    kind: str = "exact"  # exact | flips | random | dtype
    fused: str = ""  # for ``flips``: the model whose changes arcee_fusion takes


CASES = [
    Case("linear", "merge_method: linear\n" + THREE.replace("{extra}", "") + "dtype: float32\n"),
    Case(
        "linear gradient, normalize false",
        "merge_method: linear\nmodels:\n  - model: {math}\n    parameters: {{weight: [0.2, 0.9]}}\n"
        "  - model: {code}\n    parameters: {{weight: 0.4}}\nparameters: {{normalize: false}}\ndtype: float32\n",
    ),
    Case("task_arithmetic", gta("task_arithmetic", "", "lambda: 0.9")),
    Case("ties", gta("ties", ", density: 0.5")),
    Case("ties rescale, normalize false", gta("ties", ", density: 0.3", "rescale: true, normalize: false")),
    Case("breadcrumbs", gta("breadcrumbs", ", density: 0.8, gamma: 0.02")),
    Case("breadcrumbs_ties", gta("breadcrumbs_ties", ", density: 0.8, gamma: 0.02")),
    Case("dare_ties density 1", gta("dare_ties", ", density: 1.0")),
    Case("dare_linear density 1", gta("dare_linear", ", density: 1.0")),
    Case("della density 1, epsilon 0", gta("della", ", density: 1.0, epsilon: 0.0")),
    Case("della_linear density 1, epsilon 0", gta("della_linear", ", density: 1.0, epsilon: 0.0")),
    Case("dare_ties", gta("dare_ties", ", density: 0.5"), "random"),
    Case("dare_linear", gta("dare_linear", ", density: 0.5"), "random"),
    Case("della", gta("della", ", density: 0.5, epsilon: 0.1"), "random"),
    Case("della_linear", gta("della_linear", ", density: 0.5, epsilon: 0.1"), "random"),
    Case("slerp", plain("slerp", ("math",), True, "t: [0.1, 0.9]")),
    Case(
        "nuslerp",
        "merge_method: nuslerp\nbase_model: {base}\nmodels:\n  - model: {math}\n    parameters: {{weight: 0.3}}\n"
        "  - model: {code}\n    parameters: {{weight: 0.7}}\ndtype: float32\n",
    ),
    Case(
        "nuslerp no base, rows",
        "merge_method: nuslerp\nmodels:\n  - model: {math}\n    parameters: {{weight: 0.3}}\n"
        "  - model: {code}\n    parameters: {{weight: 0.7}}\nparameters: {{nuslerp_flatten: false, "
        "nuslerp_row_wise: true}}\ndtype: float32\n",
    ),
    Case(
        "multislerp",
        "merge_method: multislerp\nbase_model: {base}\n" + THREE.replace("{extra}", "") + "dtype: float32\n",
    ),
    Case("karcher", plain("karcher", ("math", "code", "instruct"), False)),
    Case("model_stock", plain("model_stock", ("math", "code", "instruct"), True)),
    Case("model_stock filter_wise", plain("model_stock", ("math", "code"), True, "filter_wise: true")),
    Case("nearswap", plain("nearswap", ("math",), True, "t: 0.0005")),
    Case("sce", plain("sce", ("math", "code", "instruct"), True, "select_topk: 0.7")),
    Case(
        "passthrough",
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: {math}\n        layer_range: [0, 2]\n"
        "  - sources:\n      - model: {code}\n        layer_range: [1, 3]\ndtype: float32\n",
    ),
    Case("arcee_fusion", plain("arcee_fusion", ("math",), True), "flips", "math"),
    Case("arcee_fusion wide", plain("arcee_fusion", ("wide",), True), "flips", "wide"),
    Case("arcee_fusion bfloat16", plain("arcee_fusion", ("math",), True).replace("float32", "bfloat16"), "dtype"),
    Case(
        "arcee_fusion float64",
        plain("arcee_fusion", ("math",), True).replace("dtype: float32\n", "dtype: float64\nout_dtype: float32\n"),
    ),
    Case(  # both tools ignore the generic switches recipes copied from TIES carry
        "arcee_fusion float64, normalize and int8_mask ignored",
        plain("arcee_fusion", ("math",), True, "normalize: true, int8_mask: true").replace(
            "dtype: float32\n", "dtype: float64\nout_dtype: float32\n"
        ),
    ),
    Case("ram", plain("ram", ("math", "code", "instruct"), True)),
    Case("ram epsilon 1e-3", plain("ram", ("math", "code", "instruct"), True, "epsilon: 0.001")),
    Case("ramplus_tl", plain("ramplus_tl", ("math", "code", "instruct"), True)),
    Case(
        "ramplus_tl epsilon 1e-3, r 0.5, alpha 2",
        plain("ramplus_tl", ("math", "code", "instruct"), True, "epsilon: 0.001, r: 0.5, alpha: 2.0"),
    ),
]


def build_models(root: Path) -> dict[str, Path]:
    from gift_merge.toy.tiny_models import build_family, build_model

    models = {name: root / name for name in ("base", "instruct", "math", "code", "wide")}
    if all((path / "config.json").exists() for path in models.values()):
        return models
    build_family(root, "llama", seed=3)
    build_model(
        models["wide"], "llama", seed=3999, perturb_from=models["base"], perturb_scale=1e-2, max_shard_size="100KB"
    )
    return models


def load(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@dataclass
class Row:
    case: Case
    tensors: int = 0
    equal: int = 0
    differing: int = 0
    max_diff: float = 0.0
    worst: float = 0.0  # max over tensors of max|Δ| / max(1, max|θ_mergekit|)
    kept: int = 0  # flips: entries mergekit's mask keeps
    non_flips: int = 0
    seconds: tuple[float, float] = (0.0, 0.0)
    error: str = ""
    dtypes: tuple[str, str] = ("", "")  # dtype: what gift-merge and mergekit wrote

    @property
    def verdict(self) -> str:
        if self.case.kind == "random":
            return "random masks (not compared)" if not self.error else "info: a tool failed"
        if self.error:
            return "FAIL"
        if self.case.kind == "dtype":
            return f"info: gift-merge writes {self.dtypes[0]}, mergekit {self.dtypes[1]} (mergekit issue #604)"
        if self.case.kind == "flips":
            share = f"{self.differing} flips, {self.differing / max(self.kept, 1):.1%} of mergekit's {self.kept} kept"
            return ("ok: " if self.non_flips == 0 else f"FAIL ({self.non_flips} not flips): ") + share
        return "ok" if self.worst <= TOLERANCE else f"FAIL (> {TOLERANCE:g} relative)"

    @property
    def failed(self) -> bool:
        return self.verdict.startswith("FAIL")


def compare(row: Row, ours: Path, theirs: Path, models: dict[str, Path]) -> None:
    got, want = load(ours), load(theirs)
    if set(got) != set(want):
        mine_only, theirs_only = sorted(set(got) - set(want))[:3], sorted(set(want) - set(got))[:3]
        row.error = f"tensor names differ: only gift-merge {mine_only}, only mergekit {theirs_only}"
        return
    flip_inputs = (load(models["base"]), load(models[row.case.fused])) if row.case.kind == "flips" else None
    for name, mine in got.items():
        other = want[name]
        if row.case.kind == "dtype":
            row.dtypes = (str(mine.dtype).removeprefix("torch."), str(other.dtype).removeprefix("torch."))
            mine, other = mine.float(), other.float()
        if mine.dtype != other.dtype or mine.shape != other.shape:
            row.error = (
                f"{name}: gift-merge {mine.dtype} {tuple(mine.shape)}, mergekit {other.dtype} {tuple(other.shape)}"
            )
            return
        row.tensors += 1
        same = mine.view(torch.uint8).reshape(-1).equal(other.view(torch.uint8).reshape(-1))
        row.equal += same
        diff = (mine.double() - other.double()).abs()
        row.differing += int((mine != other).sum())
        row.max_diff = max(row.max_diff, float(diff.max()) if diff.numel() else 0.0)
        scale = max(1.0, float(other.double().abs().max())) if other.numel() else 1.0
        row.worst = max(row.worst, (float(diff.max()) if diff.numel() else 0.0) / scale)
        if flip_inputs is not None:
            base, theta = flip_inputs[0][name], flip_inputs[1][name]
            applied = base + (theta - base)
            row.kept += int(((other == applied) & (applied != base)).sum())
            flip = ((mine == base) & (other == applied)) | ((mine == applied) & (other == base))
            row.non_flips += int(((mine != other) & ~flip).sum())


def run(command: list[str], log: Path) -> tuple[bool, float]:
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, check=False)
    return done.returncode == 0, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "bench-work" / "parity")
    parser.add_argument("--mergekit", type=Path, default=REPO_ROOT / "bench-work/mergekit-venv/bin/mergekit-yaml")
    parser.add_argument("--gift-merge", type=Path, default=Path(sys.executable).parent / "gift-merge")
    parser.add_argument("--only", default="", help="comma-separated substrings of case names")
    args = parser.parse_args()
    if not args.mergekit.exists():
        print(
            f"mergekit not found at {args.mergekit}: run benchmarks/setup_mergekit.sh or pass --mergekit",
            file=sys.stderr,
        )
        return 2
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    cases = [c for c in CASES if not wanted or any(w in c.name for w in wanted)]
    models = build_models(args.workdir / "models")
    rows = []
    for index, case in enumerate(cases):
        folder = args.workdir / "cases" / f"{index:02d}-{case.name.replace(' ', '_').replace(',', '')}"
        folder.mkdir(parents=True, exist_ok=True)
        recipe = folder / "recipe.yml"
        recipe.write_text(case.recipe.format(**{k: str(v) for k, v in models.items()}))
        row = Row(case)
        ok_mk, t_mk = run([str(args.mergekit), str(recipe), str(folder / "mergekit"), "--random-seed", "0", "--quiet"],
                          folder / "mergekit.log")  # fmt: skip
        ok_gm, t_gm = run([str(args.gift_merge), "run", str(recipe), str(folder / "gift-merge"), "--overwrite", "-q"],
                          folder / "gift-merge.log")  # fmt: skip
        row.seconds = (t_mk, t_gm)
        if not (ok_mk and ok_gm):
            failed = [tool for tool, ok in (("mergekit", ok_mk), ("gift-merge", ok_gm)) if not ok]
            row.error = f"{' and '.join(failed)} failed (logs in {folder})"
        elif case.kind != "random":
            compare(row, folder / "gift-merge", folder / "mergekit", models)
        rows.append(row)
        print(f"[{index + 1}/{len(cases)}] {case.name}: {row.error or row.verdict}", file=sys.stderr, flush=True)

    print("| case | tensors | bytes equal | entries differing | max abs diff | verdict |")
    print("|---|---:|---:|---:|---:|---|")
    for row in rows:
        if row.case.kind == "random" or row.error:
            print(f"| {row.case.name} | | | | | {row.error or row.verdict} |")
            continue
        print(
            f"| {row.case.name} | {row.tensors} | {row.equal} | {row.differing} | {row.max_diff:.3g} | {row.verdict} |"
        )
    failed = [row.case.name for row in rows if row.failed]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} cases ok" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
