"""``make demo``: what gift-merge is for, offline on a CPU in a few minutes.

1. Builds the tiny random model family the shipped example recipes use (``demo/models``) and runs the
   merge-only quickstart (``recipes/quickstart.yaml``), so every recipe in ``recipes/`` runs afterwards.
2. Builds (or reuses) the toy family (:mod:`gift_merge.toy`): a small Llama base pretrained on synthetic
   text, an instruct model that is a small change of it, and task data in another style. Its own sanity
   gates (drift, the instruct model's competence, its confidence on the task data) are printed first; if
   one fails, the demo says which and why instead of comparing anything.
3. Runs ``recipes/compare-demo.yaml``: GIFT's baselines built from that pair, evaluated on held-out
   problems and instructions over three seeds, the transfer gate checked, ranked, plotted.

Run from the repository root. ``--smoke`` shrinks every step (a few seconds of training, one seed, a few
documents) to check the pipeline, as the test suite does; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from gift_merge.errors import GiftMergeError

SMOKE_SCALE = 0.02
"""Training steps and rows of the toy family under ``--smoke``, as a fraction of the real build."""


def main(root: Path | None = None, *, smoke: bool = False) -> int:
    root = (root or Path.cwd()).resolve()
    recipes = root / "recipes"
    if not (recipes / "compare-demo.yaml").is_file():
        print(
            f"error: {recipes / 'compare-demo.yaml'} not found; run the demo from the repository root", file=sys.stderr
        )
        return 2
    started = time.perf_counter()
    try:
        quickstart = _quickstart(root)
        gates_hold = _toy_family(root, smoke=smoke)
        if not gates_hold and not smoke:
            return 1
        results = _compare(root, smoke=smoke)
    except GiftMergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    minutes = (time.perf_counter() - started) / 60
    print(f"\nthe demo took {minutes:.1f} min. Merge-only quickstart output: {quickstart}")
    print(f"comparison: {results / 'results.md'} and the plots beside it (scores.png, pareto.png, sweep-*.png)")
    print("\nnext (`source .venv/bin/activate` puts gift-merge on the PATH, or call .venv/bin/gift-merge):")
    print("  gift-merge plan recipes/compare-demo.yaml       # every stage the comparison builds")
    print(
        "  gift-merge eval demo/toy/instruct --tasks toy_task,toy_instruct --limit 20   # one model, any lm-eval task"
    )
    print("  gift-merge run recipes/gift-pipeline.yaml      # GIFT end to end on the tiny models")
    print("  gift-merge compare recipes/compare-baselines.yaml   # the same comparison on the tiny random models")
    return 0


def _quickstart(root: Path) -> Path:
    from gift_merge.merge import MergeOptions, run_recipe
    from gift_merge.recipe import load_recipe
    from gift_merge.toy.tiny_models import build_adapter, build_family

    models = root / "demo" / "models"
    if not (models / "code" / "config.json").is_file():
        print(f"building a tiny random model family (base, instruct, math, code) in {models} …")
        build_family(models, "llama", seed=0)
    adapter = root / "demo" / "adapters" / "math-lora"
    if not (adapter / "adapter_config.json").is_file():
        build_adapter(models / "base", adapter, seed=0)
    out = run_recipe(load_recipe(root / "recipes" / "quickstart.yaml"), None, MergeOptions(overwrite=True, quiet=True))
    print(f"merged model: {out}  (recipes/quickstart.yaml, TIES of the tiny random models)")
    return out


def _toy_family(root: Path, *, smoke: bool) -> bool:
    """Build or reuse the toy family; print its gates; whether they all hold."""
    from gift_merge.toy.family import build_toy_family
    from gift_merge.toy.gates import family_gates

    folder = root / "demo" / "toy"
    scale = SMOKE_SCALE if smoke else 1.0
    print(f"\nthe toy family in {folder} (built once, about 2 minutes on 2 cores; reused afterwards) …")
    paths = build_toy_family(folder, seed=0, threads=2, steps_scale=scale)
    print("family checks:")
    gates = family_gates(paths["family"])
    for gate in gates:
        print(f"  {gate.line()}")
    failed = [g for g in gates if g.passed is False]
    if failed and not smoke:
        print(
            f"\nno comparison: the toy family failed {', '.join(g.name for g in failed)}, so a ranking on it would not"
        )
        print("compare what it claims to. Delete demo/toy to rebuild it; if it fails again, please report it.")
    return not failed


def _compare(root: Path, *, smoke: bool) -> Path:
    from gift_merge.merge import MergeOptions, run_recipe
    from gift_merge.recipe import load_recipe

    recipe = load_recipe(root / "recipes" / "compare-demo.yaml")
    if smoke and recipe.compare is not None:  # one seed and a few documents: the pipeline, not the numbers
        evaluation = dataclasses.replace(recipe.compare.evaluation, limit=6)
        spec = dataclasses.replace(recipe.compare, seeds=(0,), evaluation=evaluation)
        recipe = dataclasses.replace(recipe, compare=spec)
    print("\ncomparing GIFT's baselines on the toy family (recipes/compare-demo.yaml) …")
    return run_recipe(recipe, None, MergeOptions(quiet=True))


if __name__ == "__main__":
    import logging
    import warnings

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # progress of long steps
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notes, not the user's to act on
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="shrink every step to check the pipeline quickly")
    sys.exit(main(smoke=parser.parse_args().smoke))
