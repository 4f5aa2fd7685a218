"""Frozen, validated recipe objects: what the planner consumes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from gift_merge.errors import GiftMergeError
from gift_merge.recipe.settings import Setting

if TYPE_CHECKING:
    from gift_merge.compare.spec import CompareSpec
    from gift_merge.train.config import TrainConfig


@dataclass(frozen=True)
class ModelRef:
    """``path``, ``org/name@revision`` or ``model+adapter`` (mergekit's reference syntax).

    ``stage`` is set when the path names an earlier document of a multi-document recipe; the planner
    then reads that stage's output.
    """

    path: str
    revision: str | None = None
    adapter: str | None = None
    adapter_revision: str | None = None
    stage: str | None = None

    def __str__(self) -> str:
        text = self.path + (f"@{self.revision}" if self.revision else "")
        if self.adapter:
            text += f"+{self.adapter}" + (f"@{self.adapter_revision}" if self.adapter_revision else "")
        return text

    @property
    def model_only(self) -> ModelRef:
        return ModelRef(self.path, self.revision, stage=self.stage)

    @staticmethod
    def parse(raw: object, where: str) -> ModelRef:
        if isinstance(raw, dict):
            return _parse_dict(raw, where)
        if not isinstance(raw, str) or not raw.strip():
            raise GiftMergeError(f"{where}: expected a model path or Hub id")
        parts = raw.strip().split("+")
        if len(parts) > 2:
            raise GiftMergeError(f"{where}: {raw!r} has more than one '+' (use model+adapter)")
        model, model_rev = _split_revision(parts[0], where)
        adapter, adapter_rev = _split_revision(parts[1], where) if len(parts) == 2 else (None, None)
        return ModelRef(model, model_rev, adapter, adapter_rev)


def _split_revision(text: str, where: str) -> tuple[str, str | None]:
    pieces = text.split("@")
    if len(pieces) > 2 or not pieces[0] or (len(pieces) == 2 and not pieces[1]):
        raise GiftMergeError(f"{where}: {text!r} is not 'path' or 'path@revision'")
    return pieces[0], pieces[1] if len(pieces) == 2 else None


def _parse_dict(raw: dict, where: str) -> ModelRef:
    """mergekit's long form: ``{model: {path, revision}, lora: {path, revision}}``."""
    unknown = set(raw) - {"model", "lora", "path", "revision"}
    if unknown:
        raise GiftMergeError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    inner = raw.get("model", raw)
    if not isinstance(inner, dict) or "path" not in inner:
        raise GiftMergeError(f"{where}: expected {{path, revision}}")
    lora = raw.get("lora")
    if lora is not None and (not isinstance(lora, dict) or "path" not in lora):
        raise GiftMergeError(f"{where}.lora: expected {{path, revision}}")
    return ModelRef(
        str(inner["path"]),
        inner.get("revision"),
        str(lora["path"]) if lora else None,
        lora.get("revision") if lora else None,
    )


@dataclass(frozen=True)
class InputModel:
    """One input: a ``models:`` entry or a slice source. ``layer_range`` is ``[start, end)``."""

    model: ModelRef
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None
    where: str = ""


@dataclass(frozen=True)
class SliceSpec:
    sources: tuple[InputModel, ...]
    base_model: ModelRef | None = None
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    where: str = ""


@dataclass(frozen=True)
class TokenSource:
    """Where the rows of one token come from (mergekit's per-token ``source``): ``model``'s own row for the
    token, ``model``'s row for another token (``model_token``: ``token`` or ``token_id``), or ``zero``."""

    kind: Literal["model", "model_token", "zero"]
    model: ModelRef | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenSpec:
    """One entry of ``tokenizer.tokens``: the token joins the vocabulary; ``source`` says where its rows
    come from for models that lack it (for every model with ``force``)."""

    source: TokenSource | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """``tokenizer_source`` / ``tokenizer``: the merged vocabulary and how embedding rows follow it.

    ``source`` is ``base`` (the base model's tokenizer), ``union`` (the base's, then every other model's
    tokens it lacks) or ``model`` (``model``'s tokenizer)."""

    source: Literal["base", "union", "model"]
    model: ModelRef | None = None
    tokens: Mapping[str, TokenSpec] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None

    def references(self) -> list[ModelRef]:
        """The models this section names: the tokenizer's model and the token sources' models."""
        refs = [self.model] + [t.source.model for t in self.tokens.values() if t.source is not None]
        return [r for r in refs if r is not None]


@dataclass(frozen=True)
class MergeStage:
    """One merge: a whole single-document recipe, or one document of a multi-document one."""

    merge_method: str
    models: tuple[InputModel, ...] | None = None
    slices: tuple[SliceSpec, ...] | None = None
    base_model: ModelRef | None = None
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None
    name: str | None = None
    output: str | None = None
    text: str = ""


@dataclass(frozen=True)
class TrainStage:
    """A document with a ``train:`` section: a GIFT (or SFT) LoRA adapter trained on ``base``.

    ``config.out`` is a placeholder: the adapter goes to the stage folder (``OUT-stages/<name>``), or to
    the output folder when this is the final document. ``base`` and ``instruct`` may name earlier
    stages, like any model reference.
    """

    config: TrainConfig
    base: ModelRef
    instruct: ModelRef | None = None
    name: str | None = None
    output: str | None = None
    text: str = ""
    where: str = ""


Stage = MergeStage | TrainStage


@dataclass(frozen=True)
class Recipe:
    """A loaded recipe: its stages in execution order (dependencies first)."""

    stages: tuple[Stage, ...]
    folder: Path
    path: Path | None = None
    text: str = ""
    compare: CompareSpec | None = None  # a recipe with a ``compare:`` document builds and ranks arms

    @property
    def final(self) -> Stage:
        if not self.stages:
            raise GiftMergeError("the recipe has no merge or train document")
        return self.stages[-1]
