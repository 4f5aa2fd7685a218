"""``baselines: {preset: gift, …}``: the GIFT paper's comparison from one base model, its instruct model
and one training set.

Every adapter is trained with the same LoRA settings, data and steps (the ``train:`` mapping), so the
arms differ only in how the task knowledge reaches the instruct model:

| arm | what it is |
|---|---|
| ``instruct`` | the instruct model as it is (the reference) |
| ``instruct-sft`` | a LoRA SFT adapter trained on the instruct model, merged back into it |
| ``shadow-ft`` | a LoRA SFT adapter trained on the base, added to the instruct model (Shadow-FT) |
| ``gift`` | a GIFT adapter (tokens weighted by the instruct model's confidence) trained on the base, added |
| ``task-arithmetic-weight=λ`` | θ_B + (θ_I − θ_B) + λ·ΔW_SFT: the chat-vector view, over a λ grid |
| ``ties``, ``dare-ties`` | TIES / DARE-TIES of the instruct delta and the SFT delta over the base |
"""

from __future__ import annotations

from typing import Any

from gift_merge.compare.spec import ArmSpec, ExtraDocument
from gift_merge.errors import GiftMergeError
from gift_merge.recipe.loader import check_keys
from gift_merge.recipe.schema import ModelRef

PRESETS = ("gift",)
KEYS = ("preset", "base", "instruct", "data", "train", "weights", "density", "dtype")
DEFAULT_WEIGHTS = (0.5, 1.0, 1.5)
DEFAULT_DENSITY = 0.5
ADAPTERS = {  # stage name → (trained on, mode)
    "adapter-sft-instruct": ("instruct", "sft"),
    "adapter-sft-base": ("base", "sft"),
    "adapter-gift-base": ("base", "gift"),
}
_DECIDED_BY_PRESET = ("base", "instruct", "data", "mode")


def expand_baselines(raw: Any, where: str, stage_names: set[str]) -> tuple[list[ArmSpec], list[ExtraDocument]]:
    if not isinstance(raw, dict):
        raise GiftMergeError(f"{where}: expected a mapping with preset, base, instruct, data and train")
    check_keys(raw, KEYS, where)
    preset = raw.get("preset", "gift")
    if preset not in PRESETS:
        raise GiftMergeError(f"{where}.preset: {preset!r} is not a preset ({', '.join(PRESETS)})")
    for key in ("base", "instruct", "data"):
        if not isinstance(raw.get(key), str):
            raise GiftMergeError(f"{where}.{key}: required (a model reference, or for data a JSON Lines file)")
    shared = raw.get("train") or {}
    if not isinstance(shared, dict):
        raise GiftMergeError(f"{where}.train: expected a mapping of training options (as `gift-merge train`'s)")
    for key in _DECIDED_BY_PRESET:
        if key in shared:
            raise GiftMergeError(f"{where}.train.{key}: set by the preset for each adapter; remove it")
    weights = raw.get("weights", list(DEFAULT_WEIGHTS))
    if not isinstance(weights, list) or not weights or not all(isinstance(w, int | float) for w in weights):
        raise GiftMergeError(f"{where}.weights: expected a list of numbers (the λ grid)")
    density = raw.get("density", DEFAULT_DENSITY)
    taken = set(ADAPTERS) & stage_names
    if taken:
        raise GiftMergeError(f"{where}: the recipe already has a document named {sorted(taken)[0]!r}")
    models = {"base": raw["base"], "instruct": raw["instruct"]}
    for role, ref in models.items():
        ModelRef.parse(ref, f"{where}.{role}")
    dtype = {"dtype": raw["dtype"]} if raw.get("dtype") is not None else {}

    docs = [_train_doc(name, models, on, mode, raw["data"], shared, where) for name, (on, mode) in ADAPTERS.items()]

    def transfer(adapter: str) -> dict[str, Any]:
        return {"merge_method": "gift", "base_model": models["instruct"], "models": [{"model": adapter}], **dtype}

    def over_base(method: str, extra: dict[str, Any]) -> dict[str, Any]:
        entries = [
            {"model": m, "parameters": {"weight": 1.0, **extra}} for m in (models["instruct"], "adapter-sft-base")
        ]
        return {"merge_method": method, "base_model": models["base"], "models": entries, **dtype}

    arms = [ArmSpec("instruct", f"model {models['instruct']}", model=ModelRef.parse(models["instruct"], where))]
    merges = {
        "instruct-sft": ("gift (adapter trained on the instruct model)", transfer("adapter-sft-instruct")),
        "shadow-ft": ("gift (SFT adapter trained on the base)", transfer("adapter-sft-base")),
        "gift": ("gift (GIFT adapter trained on the base)", transfer("adapter-gift-base")),
    }
    for weight in weights:
        doc = over_base("task_arithmetic", {})
        doc["models"][1]["parameters"]["weight"] = float(weight)
        merges[f"task-arithmetic-weight={weight:g}"] = (f"task_arithmetic (λ = {weight:g})", doc)
    merges["ties"] = (f"ties (density {density:g})", over_base("ties", {"density": density}))
    merges["dare-ties"] = (f"dare_ties (density {density:g})", over_base("dare_ties", {"density": density}))
    for name, (source, doc) in merges.items():
        if name in stage_names:
            raise GiftMergeError(f"{where}: the recipe already has a document named {name!r}")
        sweep = family = None
        if name.startswith("task-arithmetic-weight="):
            sweep, family = {"weight": float(name.split("=", 1)[1])}, "task-arithmetic"
        arms.append(ArmSpec(name, source, stage=name, sweep=sweep, family=family))
        docs.append(ExtraDocument({"name": name, **doc}, f"{where}[{name}]"))
    return arms, docs


def _train_doc(
    name: str, models: dict[str, str], on: str, mode: str, data: str, shared: dict[str, Any], where: str
) -> ExtraDocument:
    section: dict[str, Any] = {"base": models[on], "data": data, "mode": mode, **shared}
    if mode == "gift":
        section["instruct"] = models["instruct"]
    return ExtraDocument({"name": name, "train": section}, f"{where}[{name}]")
