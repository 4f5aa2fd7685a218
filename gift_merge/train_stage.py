"""A recipe's ``train:`` document: planned together with the merge stages, run by the GIFT trainer.

The merge stages after a train stage are planned before anything trains, so the adapter is described
by what training will produce: one LoRA patch on every weight of the chosen target modules, chosen by
the same rule training uses (:func:`~gift_merge.train.targets.choose_targets`). Once trained, the
stage is re-planned against the real adapter, as merge stages are against their real outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gift_merge.errors import GiftMergeError
from gift_merge.inputs import ModelInfo, ModelResolver
from gift_merge.io import artifacts
from gift_merge.io.adapter import CONFIG_NAME, Patch
from gift_merge.recipe.schema import TrainStage
from gift_merge.train.config import TrainConfig
from gift_merge.train.data import file_sha256, iter_jsonl
from gift_merge.train.output import PROVENANCE_NAME
from gift_merge.train.targets import choose_targets, leaf_names_from_tensors, matrices


@dataclass(frozen=True)
class TrainPlan:
    """What a train stage will do, checked without loading a model or reading the data."""

    stage: TrainStage
    base: ModelInfo
    targets: list[str]
    patches: dict[str, Patch]  # base weight name → the LoRA patch training will put on it

    def describe(self) -> str:
        c = self.stage.config
        instruct = f", scores from {self.stage.instruct}" if self.stage.instruct else ""
        return (
            f"train {c.mode} LoRA (r {c.r}, alpha {c.alpha:g}) on {self.base.label} with {c.data}{instruct}: "
            f"{len(self.patches)} weights in {', '.join(self.targets)}"
        )


def plan_training(stage: TrainStage, resolver: ModelResolver) -> TrainPlan:
    """Check the stage's models, data and targets; fail naming the YAML key."""
    config, where = stage.config, f"{stage.where}.train"
    base = resolver.resolve(stage.base)
    if base.is_adapter:
        raise GiftMergeError(f"{where}.base: {base.label} is an adapter; train on a model")
    if stage.instruct is not None:
        instruct = resolver.resolve(stage.instruct)
        if instruct.is_adapter:
            raise GiftMergeError(f"{where}.instruct: {instruct.label} is an adapter, not a model")
    _check_data(config, where, has_instruct=stage.instruct is not None)
    shapes = {name: shape for name, (shape, _) in base.tensors.items()}
    targets = choose_targets(leaf_names_from_tensors(shapes), config.targets, base.label, key=f"{where}.targets")
    scale = config.alpha / config.r
    patches = {f"{module}.weight": Patch("lora", module, scale) for module, leaf in matrices(shapes) if leaf in targets}
    return TrainPlan(stage, base, targets, patches)


def _check_data(config: TrainConfig, where: str, *, has_instruct: bool) -> None:
    path = Path(config.data)
    if not path.is_file():
        raise GiftMergeError(f"{where}.data: {path} not found")
    if config.mode != "gift" or has_instruct:
        return
    first = next(iter_jsonl(path), None)
    if first is None:
        raise GiftMergeError(f"{path}: no rows")
    if "scores" not in first[1]:
        raise GiftMergeError(
            f"{where}: mode gift needs \"scores\" in {path} (first row has none) or an 'instruct' model to annotate it"
        )


def stage_config(stage: TrainStage, target: Path, folders: dict[str, Path], *, overwrite: bool) -> TrainConfig:
    """The stage's options with its output folder and the folders of the stages it trains on."""
    changes: dict[str, object] = {"out": str(target), "overwrite": overwrite}
    if stage.base.stage:
        changes["base"] = str(folders[stage.base.stage])
    if stage.instruct is not None and stage.instruct.stage:
        changes["instruct"] = str(folders[stage.instruct.stage])
    return stage.config.replace(**changes)


def run_training(stage: TrainStage, target: Path, folders: dict[str, Path], *, overwrite: bool, quiet: bool) -> None:
    """Train into ``target`` (atomically, by the trainer), then record the stage text that made it."""
    from gift_merge.train.loop import train

    train(stage_config(stage, target, folders, overwrite=overwrite), quiet=quiet)
    (target / artifacts.RECIPE_NAME).write_text(stage.text)


def training_is_current(folder: Path, stage: TrainStage) -> bool:
    """An adapter made by this very stage text from the data file as it is now."""
    provenance = folder / PROVENANCE_NAME
    if not (provenance.is_file() and artifacts.made_by_stage_text(folder, stage.text, CONFIG_NAME)):
        return False
    try:
        recorded = json.loads(provenance.read_text()).get("data_sha256")
    except ValueError:
        return False
    return recorded == file_sha256(stage.config.data)
