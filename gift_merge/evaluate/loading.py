"""What ``gift-merge eval`` evaluates: a model folder, a Hub id, ``MODEL+ADAPTER``, or a stage of a recipe.

The evaluated model is loaded once, in this process, and handed to lm-evaluation-harness as an object,
so a merged output, an adapter applied to its base, or a recipe's stage are all evaluated by the same
code. An adapter is applied with peft's own ``merge_and_unload`` (the reference that gift-merge's
``gift`` transfer is tested against), so what is scored is what peft users would load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gift_merge.errors import GiftMergeError
from gift_merge.recipe.schema import ModelRef, Stage

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

RECIPE_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class EvalTarget:
    """The folders behind a reference: the model, and the adapter to merge into it, if any."""

    label: str
    model: Path
    adapter: Path | None = None


@dataclass
class LoadedModel:
    target: EvalTarget
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def resolve_target(reference: str) -> EvalTarget:
    """``RECIPE.yaml[:STAGE]``, ``MODEL``, ``MODEL@REV`` or ``MODEL+ADAPTER`` → local folders."""
    recipe, _, stage = reference.partition(":")
    if recipe.endswith(RECIPE_SUFFIXES):
        return recipe_stage_target(Path(recipe), stage or None)
    return model_target(ModelRef.parse(reference, "MODEL"), relative_to=None)


def model_target(ref: ModelRef, *, relative_to: Path | None, folders: dict[str, Path] | None = None) -> EvalTarget:
    """Folders of a model reference; ``folders`` maps recipe stage names to their built outputs."""
    from gift_merge.io.locate import locate

    def folder_of(path: str, revision: str | None, stage: str | None) -> Path:
        if stage is not None and folders is not None:
            return folders[stage]
        return locate(path, revision, relative_to=relative_to)

    model = folder_of(ref.path, ref.revision, ref.stage)
    adapter = None
    if ref.adapter is not None:
        adapter = locate(ref.adapter, ref.adapter_revision, relative_to=relative_to)
    return EvalTarget(str(ref), model, adapter)


def recipe_stage_target(recipe_path: Path, stage_name: str | None) -> EvalTarget:
    """The built output of a recipe's final document, or of its document named ``stage_name``.

    A ``train:`` stage's output is an adapter; it is evaluated on the model it was trained on.
    """
    from gift_merge.merge import resolve_output, stage_folders
    from gift_merge.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    out = resolve_output(recipe, None)
    folders = stage_folders(recipe, out, None)
    if stage_name is None:
        stage, folder = recipe.final, out
    else:
        matches = [s for s in recipe.stages if s.name == stage_name]
        if not matches:
            names = ", ".join(s.name for s in recipe.stages if s.name) or "none"
            raise GiftMergeError(f"{recipe_path}: no stage named {stage_name!r} (stages: {names})")
        stage = matches[0]
        folder = folders.get(stage_name, out)
    label = f"{recipe_path}:{stage_name}" if stage_name else str(recipe_path)
    if not folder.is_dir():
        raise GiftMergeError(f"{label}: not built yet ({folder} is missing); run `gift-merge run {recipe_path}` first")
    return built_stage_target(label, stage, folder, recipe.folder, folders)


def built_stage_target(
    label: str, stage: Stage, folder: Path, recipe_folder: Path, folders: dict[str, Path]
) -> EvalTarget:
    """What a built stage in ``folder`` is evaluated as: a merge its folder, a ``train:`` stage its adapter
    on the model it was trained on (``folders`` locates earlier stages of the recipe)."""
    from gift_merge.recipe.schema import TrainStage

    if isinstance(stage, TrainStage):
        base = model_target(stage.base, relative_to=recipe_folder, folders=folders)
        return EvalTarget(label, base.model, folder)
    return EvalTarget(label, folder)


def load_for_eval(target: EvalTarget, *, device: str, dtype: str) -> LoadedModel:
    """Load the model (and merge its adapter) on ``device``; ``dtype`` ``auto`` is bf16 on a GPU, else fp32."""
    from gift_merge.train.model import load_model, load_tokenizer, resolve_device, resolve_dtype

    torch_device = resolve_device(device)
    model = load_model(target.model, resolve_dtype(dtype, torch_device), torch_device, quiet=True)
    tokenizer, _ = load_tokenizer(str(target.model))
    if target.adapter is not None:
        model = _merge_adapter(model, target.adapter)
    model.eval()
    return LoadedModel(target, model, tokenizer)


def _merge_adapter(model: PreTrainedModel, adapter: Path) -> PreTrainedModel:
    from peft import PeftModel

    try:
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise GiftMergeError(f"{adapter}: cannot apply this adapter ({str(exc).splitlines()[0]})") from exc
    return merged  # merge_and_unload returns the underlying model
