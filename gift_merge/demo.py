"""``make demo``: build a tiny model family locally, merge it with the quickstart recipe, load the result,
then run the whole GIFT method (annotate, train, transfer) from one recipe.

Runs offline in under a minute on a CPU; nothing is downloaded. Run from the repository root.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gift_merge.errors import GiftMergeError


def main(root: Path | None = None) -> int:
    root = (root or Path.cwd()).resolve()
    recipe_path = root / "recipes" / "quickstart.yaml"
    if not recipe_path.is_file():
        print(f"error: {recipe_path} not found; run the demo from the repository root", file=sys.stderr)
        return 2
    from gift_merge.merge import MergeOptions, run_recipe, stage_folders
    from gift_merge.recipe import load_recipe
    from gift_merge.tiny_models import build_adapter, build_family
    from gift_merge.train.output import LOG_NAME

    models = root / "demo" / "models"
    if not (models / "code" / "config.json").is_file():
        print(f"building a tiny model family (base, instruct, math, code) in {models} …")
        build_family(models, "llama", seed=0)
    adapter = root / "demo" / "adapters" / "math-lora"
    if not (adapter / "adapter_config.json").is_file():
        build_adapter(models / "base", adapter, seed=0)
    pipeline_path = root / "recipes" / "gift-pipeline.yaml"
    try:
        out = run_recipe(load_recipe(recipe_path), None, MergeOptions(overwrite=True))
        print(f"\nGIFT in one recipe ({pipeline_path.name}): annotate, train a LoRA adapter on the base, transfer …")
        pipeline = load_recipe(pipeline_path)
        gift_out = run_recipe(pipeline, None, MergeOptions(overwrite=True))
    except GiftMergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    generated = model.generate(ids, max_new_tokens=8, do_sample=False, suppress_tokens=tokenizer.all_special_ids)
    reply = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
    print(f"\nmerged model: {out}")
    print(f"  recipe: {recipe_path}   inputs: {models}")
    print(f"  a random tiny model's reply (gibberish is expected): {reply!r}")
    train_stage = pipeline.stages[0].name or ""  # the recipe's first document trains the adapter
    adapter_out = stage_folders(pipeline, gift_out, None)[train_stage]  # where run_recipe trained it
    losses = [json.loads(line)["loss"] for line in (adapter_out / LOG_NAME).read_text().splitlines()]
    print(f"\nGIFT-merged model: {gift_out}")
    print(f"  adapter: {adapter_out} (GIFT-weighted loss {losses[0]:.2f} → {losses[-1]:.2f} in {len(losses)} steps)")
    print("\nload it like any transformers model:")
    print("  from transformers import AutoModelForCausalLM")
    print(f"  model = AutoModelForCausalLM.from_pretrained({str(out)!r})")
    print("\nnext (`source .venv/bin/activate` puts gift-merge on the PATH, or call .venv/bin/gift-merge):")
    print("  gift-merge plan recipes/quickstart.yaml        # every output tensor, its inputs and parameters")
    print(
        "  gift-merge run recipes/gift-transfer.yaml      # add a LoRA adapter to the instruct model (GIFT's last step)"
    )
    print("  gift-merge plan recipes/gift-pipeline.yaml     # what the GIFT pipeline trains and merges")
    print("  gift-merge compare recipes/compare-baselines.yaml  # GIFT's baselines built, evaluated, ranked, plotted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
