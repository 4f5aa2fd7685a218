"""Check gift-merge's vocabulary merges against mergekit's on tiny float32 models with different tokenizers.

Why: ``tokenizer_source: base | union | <model>`` and the ``tokenizer:`` section (``tokens`` with sources and
``force``, ``pad_to_multiple_of``) are meant to do what mergekit 0.1.5 does; CI has no mergekit, so this
script runs both on the same recipes and compares their outputs.

How: the three word-level tokenizers and tiny Llama models of ``tests/tokenizer_zoo.py``
are built in float32 (plus tied ones, a base padded past its tokenizer, and a byte-level BPE one cut below
its tokenizer); each recipe runs through mergekit-yaml (``--mergekit``, default the benchmark
virtualenv's; its ``referenced_models()`` put in recipe order, see :data:`ORDERED_MERGEKIT`) and
``gift-merge run``. Compared, per case:

- the vocabulary: the same tokens, and the ids of each; mergekit numbers a union's new plain tokens in the
  iteration order of a Rust hash map, which changes from run to run, so ids there may differ by a
  permutation of those tokens only;
- every tensor: non-vocabulary ones byte for byte; vocabulary tensors row by row, each token's row in
  mergekit's output against the same token's row in gift-merge's; padding rows (the mean of the
  re-indexed rows, which torch and gift-merge sum in different orders) within 1e-6;
- ``config.json``'s ``vocab_size``, and the tokens each tokenizer splits a sample text into.

One line per case; exit status 1 if any case differs beyond that. Known, intended differences are
reported, not failed: where the base's embedding is padded past its tokenizer, gift-merge keeps the
padded row count (mergekit shrinks it, its issue #425), so only the rows both have are compared. Example::

    .venv/bin/python benchmarks/mergekit_tokenizer_parity.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
MERGEKIT = REPO_ROOT / "bench-work" / "mergekit-venv" / "bin" / "mergekit-yaml"
GIFT_MERGE = Path(sys.executable).parent / "gift-merge"
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
SAMPLE = "the cat <|im_start|> bird on a mat <|tool|> fish tree <|m2_only|> <|new|> dog"
PAD_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Case:
    name: str
    recipe: str
    padded_base: bool = False  # gift-merge keeps the base's padded rows; mergekit shrinks to the vocabulary
    refused: bool = False  # both must refuse the recipe
    mergekit_bug: str = ""  # mergekit is known to fail on it (this says why); gift-merge must run


def cases(zoo: dict[str, Path], tied: dict[str, Path], bpe: dict[str, Path], padded: Path) -> list[Case]:
    """Every case: tokenizer sources and ``tokens`` forms, linear, task_arithmetic and ties, tied heads, a base
    cut below its tokenizer, one padded past it, and a recipe both must refuse."""
    b, m1, m2 = zoo["base"], zoo["m1"], zoo["m2"]
    tokens = f"""  tokens:
    "<|new|>": {{source: {{kind: zero}}}}
    cat: {{source: {m1}, force: true}}
    dog: {{source: {{kind: model_token, model: {m2}, token: fish}}}}
    "<|tool|>": {{source: {{kind: model_token, model: {m1}, token_id: 3}}, force: true}}
"""

    def models(base: Path, *weighted: tuple[Path, float]) -> str:
        lines = [f"base_model: {base}", "models:"]
        lines += [f"  - {{model: {m}, parameters: {{weight: {w}}}}}" for m, w in weighted]
        return "\n".join(lines) + "\ndtype: float32\n"

    two = models(b, (m1, 1.0), (m2, 0.5))
    listed = models(b, (m1, 1.0), (b, 2.0), (m2, 0.5))
    tied_models = models(tied["base"], (tied["m1"], 1.0), (tied["m2"], 1.0))
    return [
        Case("linear union", f"merge_method: linear\n{listed}tokenizer_source: union\n"),
        Case("linear union, tokens, pad 8",
             f"merge_method: linear\n{listed}tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n{tokens}"),
        Case("task_arithmetic union", f"merge_method: task_arithmetic\n{two}tokenizer_source: union\n"),
        Case("task_arithmetic union, tokens, pad 8",
             f"merge_method: task_arithmetic\n{two}tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n{tokens}"),
        Case("task_arithmetic base, tokens", f"merge_method: task_arithmetic\n{two}tokenizer:\n  source: base\n"
             f"  tokens:\n    cat: {{source: {m1}, force: true}}\n"
             f"    dog: {{source: {{kind: model_token, model: {m2}, token: fish}}}}\n"),
        Case("task_arithmetic base, tokens adding a token",
             f"merge_method: task_arithmetic\n{two}tokenizer:\n  source: base\n{tokens}",
             mergekit_bug="KeyError: adding a token to the base tokenizer also adds it to the base's own vocabulary, "
                          "past its vocab_size, and the base's permutation then lacks the new id"),
        Case("task_arithmetic model m2", f"merge_method: task_arithmetic\n{two}tokenizer_source: {m2}\n"),
        Case("ties union, pad 6 (one padding row)",
             f"merge_method: ties\n{two}parameters: {{density: 0.6}}\n"
             "tokenizer: {source: union, pad_to_multiple_of: 6}\n"),
        Case("task_arithmetic union, tied",
             f"merge_method: task_arithmetic\n{tied_models}tokenizer_source: union\n"),
        Case("task_arithmetic base, BPE base cut below its tokenizer",
             f"merge_method: task_arithmetic\n{models(bpe['base'], (bpe['m1'], 0.7))}tokenizer_source: base\n"),
        Case("task_arithmetic union, BPE base cut below its tokenizer",
             f"merge_method: task_arithmetic\n{models(bpe['base'], (bpe['m1'], 0.7))}tokenizer_source: union\n"),
        Case("task_arithmetic base, base padded past its tokenizer",
             f"merge_method: task_arithmetic\n{models(padded, (m1, 1.0))}tokenizer_source: base\n", padded_base=True),
        Case("a token's source model lacks the token",
             f"merge_method: task_arithmetic\n{two}tokenizer:\n  tokens:\n    \"<|im_end|>\": {{source: {m2}}}\n",
             refused=True),
    ]  # fmt: skip


ORDERED_MERGEKIT = """
import sys

from mergekit.config import MergeConfiguration
from mergekit.scripts.run_yaml import main


def in_recipe_order(self):
    seen = [self.base_model] if self.base_model else []
    for entry in self.models or []:
        seen.append(entry.model)
    for piece in self.slices or []:
        seen += [source.model for source in piece.sources]
    return list(dict.fromkeys(seen))


MergeConfiguration.referenced_models = in_recipe_order
sys.exit(main())
"""
"""mergekit-yaml with its models listed in recipe order. mergekit makes ``referenced_models()`` from a set of
pydantic objects, whose hashes include a class's address, so which model's tokenizer a union reads first
(and whose definition of a shared added token wins) changes from run to run; gift-merge takes recipe order."""


def vocab(folder: Path) -> dict[str, int]:
    return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)


def tensors(folder: Path) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update(load_file(str(path)))
    return found


def compare(case: Case, mk: Path, gm: Path) -> tuple[bool, str]:
    """(whether the outputs agree, a summary)."""
    problems, notes = [], []
    vm, vg = vocab(mk), vocab(gm)
    if set(vm) != set(vg):
        problems.append(
            f"tokens differ: only mergekit {sorted(set(vm) - set(vg))}, only gift-merge {sorted(set(vg) - set(vm))}"
        )
    moved = sorted(t for t in set(vm) & set(vg) if vm[t] != vg[t])
    if moved:  # mergekit's order of a union's new tokens is a hash map's: the same ids, shuffled
        if {vm[t] for t in moved} != {vg[t] for t in moved}:
            problems.append(f"ids differ for {moved}")
        else:
            notes.append(f"ids permuted among {moved}")
    tm, tg = tensors(mk), tensors(gm)
    if set(tm) != set(tg):
        problems.append(f"tensor names differ: {sorted(set(tm) ^ set(tg))}")
    worst_token, worst_pad = 0.0, 0.0
    for name in sorted(set(tm) & set(tg)):
        a, b = tm[name], tg[name]
        if name not in VOCAB_TENSORS:
            if a.shape != b.shape or a.tobytes() != b.tobytes():
                problems.append(f"{name} differs")
            continue
        if a.shape != b.shape:
            (notes if case.padded_base else problems).append(
                f"{name}: mergekit {a.shape[0]} rows, gift-merge {b.shape[0]}"
            )
        for token in set(vm) & set(vg):
            diff = float(np.abs(a[vm[token]] - b[vg[token]]).max())
            worst_token = max(worst_token, diff)
        for row in range(len(vm), min(a.shape[0], b.shape[0])):
            worst_pad = max(worst_pad, float(np.abs(a[row] - b[row]).max()))
    if worst_token > 0:
        problems.append(f"token rows differ by up to {worst_token:.3g}")
    if worst_pad > PAD_TOLERANCE:
        problems.append(f"padding rows differ by up to {worst_pad:.3g}")
    cm, cg = (json.loads((f / "config.json").read_text())["vocab_size"] for f in (mk, gm))
    if cm != cg:
        (notes if case.padded_base else problems).append(f"vocab_size: mergekit {cm}, gift-merge {cg}")
    sm, sg = (Tokenizer.from_file(str(f / "tokenizer.json")).encode(SAMPLE).tokens for f in (mk, gm))
    if sm != sg:
        problems.append(f"tokenizers split the sample differently: {sm} vs {sg}")
    summary = f"{len(vg)} tokens, {len(tg)} tensors; token rows max |Δ| {worst_token:.3g}, padding rows {worst_pad:.3g}"
    return not problems, "; ".join([summary, *notes, *problems])


def run(command: list[str], log: Path) -> bool:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with log.open("w") as fh:
        done = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False, timeout=900)
    return done.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", type=Path, default=MERGEKIT, help="mergekit-yaml (its folder's python runs it)")
    parser.add_argument("--work", type=Path, help="keep models and outputs here (default: a temporary folder)")
    parser.add_argument("--only", help="run the cases whose name contains this")
    args = parser.parse_args(argv)
    if not args.mergekit.is_file():
        print(f"no mergekit at {args.mergekit} (benchmarks/setup_mergekit.sh installs one)", file=sys.stderr)
        return 2
    from tests.tokenizer_zoo import build_bpe_pair, build_zoo, set_rows

    work = (args.work or Path(tempfile.mkdtemp(prefix="tokenizer-parity-"))).resolve()
    zoo, tied, bpe = build_zoo(work / "zoo"), build_zoo(work / "tied", tied=True), build_bpe_pair(work / "bpe")
    padded = shutil.copytree(zoo["base"], work / "zoo" / "padded", dirs_exist_ok=True)
    set_rows(padded, 16, seed=5)
    failed = 0
    for i, case in enumerate(cases(zoo, tied, bpe, padded)):
        if args.only and args.only not in case.name:
            continue
        folder = work / f"case{i}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        recipe = folder / "recipe.yaml"
        recipe.write_text(case.recipe)
        mk, gm = folder / "mergekit", folder / "gift-merge"
        python = args.mergekit.parent / "python"
        mk_ok = run([str(python), "-c", ORDERED_MERGEKIT, str(recipe), str(mk), "--quiet"], folder / "mergekit.log")
        gm_ok = run([str(GIFT_MERGE), "run", str(recipe), str(gm), "-q"], folder / "gift-merge.log")
        if case.mergekit_bug:
            ok = not mk_ok and gm_ok
            mk_said = "ran" if mk_ok else f"fails ({case.mergekit_bug})"
            summary = f"mergekit {mk_said}; gift-merge {'runs' if gm_ok else 'fails'}"
        elif case.refused:
            ok = not mk_ok and not gm_ok
            why = (folder / "gift-merge.log").read_text().strip().splitlines()[-1:] if not gm_ok else ["ran"]
            summary = f"mergekit {'ran' if mk_ok else 'refused'}; gift-merge: {why[0]}"
        elif not (mk_ok and gm_ok):
            ok, summary = False, f"{'gift-merge' if mk_ok else 'mergekit'} failed (see {folder})"
        else:
            ok, summary = compare(case, mk, gm)
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'}  {case.name}: {summary}", flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
