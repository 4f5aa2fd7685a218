"""Every option of ``gift-merge annotate`` and ``gift-merge train``, with its default, in one place.

The defaults are the GIFT paper's (Ruan et al., ACL 2026; ``sustech-nlp/gift``): LoRA r 64, alpha 128,
dropout 0.05 on the attention and MLP projections, AdamW lr 2e-4 with a linear schedule and warmup ratio
0.1, one epoch, 4 sequences per micro-batch × 64 accumulation steps (global batch 256 on one device),
max length 2048, q floor 1e-4, γ = 1.

A config is built from CLI flags or from a YAML ``train:`` mapping through :meth:`from_mapping`, which
rejects unknown keys with a typo hint. The CLI derives its flags and their help from the ``help``
metadata below, so the defaults are written down nowhere else.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gift_merge.errors import GiftMergeError
from gift_merge.suggest import did_you_mean
from gift_merge.train.prompts import PROMPT_PRESETS

MODES = ("gift", "sft")
DTYPES = ("auto", "float32", "bfloat16", "float16")
CHAT_END = "chat_end"  # --eos-token value: the end-of-turn token of the chat template
_PATH_KEYS = ("data", "out", "resume")  # resolved against the YAML file's folder
_MODEL_KEYS = ("base", "instruct")  # resolved only when such a folder exists (else a Hub id)
_ALTERNATIVES = {"prompt_preset": "prompt_template", "prompt_template": "prompt_preset"}  # one setting, two forms

C = TypeVar("C", bound="_Config")


class _FieldError(ValueError):
    """A bad value for one field; :meth:`_Config.from_mapping` names it as the user wrote it.

    ``conflict`` is another field this one cannot be combined with; its name is spelt the same way.
    """

    def __init__(self, key: str, message: str, conflict: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.conflict = conflict


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class _Config:
    """Shared validation and construction from a mapping."""

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:  # overridden
        pass

    @classmethod
    def from_mapping(
        cls: type[C],
        values: Mapping[str, Any],
        *,
        where: str | None = None,
        folder: Path | None = None,
    ) -> C:
        """Build from ``values`` (YAML or CLI), naming keys as ``where.key`` (YAML) or ``--key`` (CLI).

        Unknown keys and missing required keys are errors; ints are accepted where floats are expected,
        a comma-separated string or a list where a tuple of names is. With ``folder``, relative data and
        output paths resolve against it, as recipe paths resolve against the recipe file.

        >>> TrainConfig.from_mapping({"base": "b", "data": "d.jsonl", "out": "o", "lr": 1e-4}).lr
        0.0001
        """

        def label(key: str) -> str:
            return f"{where}.{key}" if where else "--" + key.replace("_", "-")

        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        unknown = [k for k in values if k not in fields]
        if unknown:
            key = unknown[0]
            raise GiftMergeError(f"{label(key)}: unknown option{did_you_mean(key, fields)}")
        missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and values.get(n) is None]
        if missing:
            raise GiftMergeError(f"{label(missing[0])}: required")
        kwargs = {k: _coerce(v, hints[k], label(k)) for k, v in values.items() if v is not None}
        if folder is not None:
            for key in _PATH_KEYS:
                if isinstance(kwargs.get(key), str):
                    kwargs[key] = str(folder / Path(kwargs[key]).expanduser())
            for key in _MODEL_KEYS:
                if isinstance(kwargs.get(key), str) and (folder / kwargs[key]).is_dir():
                    kwargs[key] = str((folder / kwargs[key]).resolve())
        try:
            return cls(**kwargs)
        except _FieldError as exc:
            if exc.conflict is not None:
                other = exc.conflict if where else "--" + exc.conflict.replace("_", "-")
                raise GiftMergeError(f"{label(exc.key)}: cannot be combined with {other}; {exc}") from None
            raise GiftMergeError(f"{label(exc.key)}: {exc}") from None

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a field's type hint, converting only where no information is lost."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    target = args[0] if args and typing.get_origin(hint) is not tuple else hint
    if typing.get_origin(target) is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) and i.strip() for i in items):
            raise GiftMergeError(f"{where}: expected a list of names, got {value!r}")
        return tuple(i.strip() for i in items)
    if target is bool:
        if not isinstance(value, bool):
            raise GiftMergeError(f"{where}: expected true or false, got {value!r}")
        return value
    if target is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if target is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if target is str and isinstance(value, str | Path):
        return str(value)
    names = {float: "a number", int: "an integer", str: "a string"}
    raise GiftMergeError(f"{where}: expected {names.get(target, target)}, got {value!r}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise _FieldError(key, f"must be > 0, got {value}")


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise _FieldError(key, f"must be one of {', '.join(options)}, got {value!r}{did_you_mean(value, options)}")


def _check_prompt(template: str | None, preset: str | None) -> None:
    """A preset *is* a prompt template, so at most one of the two may be given."""
    if template is not None and "{instruction}" not in template:
        raise _FieldError("prompt_template", "must contain {instruction}")
    if preset is not None:
        _choice("prompt_preset", preset, tuple(PROMPT_PRESETS))
        if template is not None:
            raise _FieldError("prompt_preset", "give one of the two (a preset is a prompt template)", "prompt_template")


def _check_shards(num_shards: int, shard: int | None, combine: bool) -> None:
    """One shard of N, or the join of all N; N = 1 is a plain run."""
    _positive("num_shards", num_shards)
    if shard is not None and num_shards == 1:
        raise _FieldError(
            "shard", f"give --num-shards N with it (the shard's index among N jobs), got --shard {shard} alone"
        )
    if shard is not None and not 0 <= shard < num_shards:
        raise _FieldError("shard", f"must be one of 0 … {num_shards - 1} for --num-shards {num_shards}, got {shard}")
    if combine and shard is not None:
        raise _FieldError("combine", "join the shards once each is done", "shard")
    if combine and num_shards == 1:
        raise _FieldError("combine", "give the number of shards to join (--num-shards N)")
    if num_shards > 1 and shard is None and not combine:
        raise _FieldError("num_shards", f"give --shard I (0 … {num_shards - 1}) to score one shard, or --combine")


def _prompt_template(template: str | None, preset: str | None) -> str | None:
    return PROMPT_PRESETS[preset] if preset is not None else template


_PRESET_HELP = (
    f"The GIFT authors' prompt, byte for byte: {', '.join(PROMPT_PRESETS)} "
    "(instead of --prompt-template or the chat template)."
)


@dataclass(frozen=True)
class AnnotateConfig(_Config):
    """Options of ``gift-merge annotate``: score every response token with the instruct model."""

    instruct: str = _opt(
        dataclasses.MISSING, "Instruct model (folder or Hub id) whose probabilities are the scores.", metavar="MODEL"
    )
    data: str = _opt(
        dataclasses.MISSING,
        "Input JSON Lines: {instruction,response}, {prompt,response} or {messages}.",
        metavar="IN.jsonl",
    )
    out: str = _opt(
        dataclasses.MISSING, 'Output JSON Lines: the input rows plus "scores": [[q, q], …].', metavar="OUT.jsonl"
    )
    prompt_template: str | None = _opt(
        None, "Prompt with {instruction}, for models without a chat template [default: the chat template]."
    )
    prompt_preset: str | None = _opt(None, _PRESET_HELP, metavar="NAME")
    max_length: int = _opt(2048, "Truncate prompt+response to max_length − 1 tokens, as the authors do.")
    batch_size: int = _opt(16, "Sequences per forward pass (length-sorted; scores differ only in float rounding).")
    device: str = _opt("auto", "cpu, cuda, cuda:1 … [auto: cuda when available].")
    dtype: str = _opt("auto", "Model dtype: float32, bfloat16, float16 [auto: bfloat16 on GPU, else float32].")
    num_shards: int = _opt(
        1,
        "Split the rows into N shards, whole batches of a single run each, for N jobs: give --shard I or "
        "--combine with it.",
        metavar="N",
    )
    shard: int | None = _opt(
        None,
        "Score only shard I (0 … N−1) into OUT.shard-I-of-N; the shard that completes the set joins them "
        "into OUT, the bytes a single run writes.",
        metavar="I",
    )
    combine: bool = _opt(False, "Only join the finished OUT.shard-I-of-N files into OUT (needs --num-shards).")

    def _check(self) -> None:
        if self.max_length < 2:
            raise _FieldError("max_length", f"must be at least 2, got {self.max_length}")
        _positive("batch_size", self.batch_size)
        _choice("dtype", self.dtype, DTYPES)
        _check_prompt(self.prompt_template, self.prompt_preset)
        _check_shards(self.num_shards, self.shard, self.combine)

    @property
    def template(self) -> str | None:
        """The ``{instruction}`` template that formats prompts (a preset's), or None for the chat template."""
        return _prompt_template(self.prompt_template, self.prompt_preset)


@dataclass(frozen=True)
class TrainConfig(_Config):
    """Options of ``gift-merge train``: a LoRA adapter on the base model, GIFT-weighted or plain SFT."""

    base: str = _opt(dataclasses.MISSING, "Base model (folder or Hub id) the adapter is trained on.", metavar="MODEL")
    data: str = _opt(
        dataclasses.MISSING, 'Training JSON Lines; rows with "scores" are used as annotated.', metavar="FILE"
    )
    out: str = _opt(
        dataclasses.MISSING, "Adapter folder to write (PEFT format, plus gift.json and a log).", metavar="DIR"
    )
    mode: str = _opt("gift", "gift: weight each token by max(q, floor)^γ; sft: plain mean (Shadow-FT).")
    instruct: str | None = _opt(
        None,
        "Instruct model: its chat template builds prompts, and it annotates data that has no scores.",
        metavar="MODEL",
    )
    prompt_template: str | None = _opt(None, "Prompt with {instruction}, instead of the chat template.")
    prompt_preset: str | None = _opt(None, _PRESET_HELP, metavar="NAME")
    eos_token: str | None = _opt(
        None,
        f"Token appended after each response; {CHAT_END}: the end of turn of the instruct model's chat template "
        "(<|im_end|>, <|eot_id|> …) [default: the base's EOS].",
        metavar="TOKEN",
    )
    r: int = _opt(
        64, "LoRA rank (--lora-r under torchrun, whose parser takes --r for its --role).", aliases=("--lora-r",)
    )
    alpha: float = _opt(128.0, "LoRA alpha (scale alpha/r).")
    dropout: float = _opt(0.05, "LoRA dropout.")
    targets: tuple[str, ...] | None = _opt(
        None, "Comma-separated module names [default: q/k/v/o/gate/up/down projections or equivalents]."
    )
    lr: float = _opt(2e-4, "Peak learning rate (AdamW).")
    epochs: int = _opt(1, "Passes over the data.")
    batch_size: int = _opt(4, "Sequences per micro-batch on each device.")
    grad_accum: int = _opt(64, "Micro-batches per optimizer step on each device.")
    drop_last_accumulation: bool = _opt(
        False,
        "Count steps as transformers 4.51 did: ⌊micro-batches / (grad_accum × devices)⌋ per epoch, skipping "
        "the last partial step [default: round up, the last step shorter].",
    )
    max_length: int = _opt(2048, "Longest training sequence, prompt + response + EOS, in tokens.")
    warmup_ratio: float = _opt(0.1, "Fraction of optimizer steps spent warming up linearly.")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = _opt(1.0, "Clip the gradient to this global norm (0: no clipping).")
    seed: int = _opt(42, "Seed for LoRA init, data order and dropout.")
    gamma: float = _opt(1.0, "GIFT exponent γ: w = max(q, floor)^γ (0 gives sft).")
    floor: float = _opt(1e-4, "GIFT floor on q.")
    device: str = _opt("auto", "cpu, cuda, cuda:1 … [auto: cuda when available; torchrun: cuda:LOCAL_RANK].")
    dtype: str = _opt("auto", "Base weights' dtype [auto: bfloat16 on GPU, else float32]; LoRA is float32.")
    gradient_checkpointing: bool = _opt(False, "Recompute activations in backward to save memory.")
    fsdp: bool = _opt(
        False,
        "Under torchrun or accelerate launch, shard the base model, LoRA and optimizer state over the processes "
        "(FSDP, one decoder layer gathered at a time), for models that do not fit one GPU [default: DDP, a "
        "whole copy per process]. A single process trains unsharded.",
    )
    save_steps: int = _opt(100, "Checkpoint every N optimizer steps into OUT.checkpoints (0: never).")
    resume: str | None = _opt(None, "Checkpoint folder (or OUT.checkpoints) to continue from.")
    overwrite: bool = _opt(False, "Replace a non-empty output folder.")
    annotate_batch_size: int = _opt(16, "Batch size of the annotation run that --instruct triggers.")

    def _check(self) -> None:
        _choice("mode", self.mode, MODES)
        _choice("dtype", self.dtype, DTYPES)
        for key in ("r", "alpha", "lr", "epochs", "batch_size", "grad_accum", "floor", "annotate_batch_size"):
            _positive(key, getattr(self, key))
        if not 0 <= self.dropout < 1:
            raise _FieldError("dropout", f"must be in [0, 1), got {self.dropout}")
        if not 0 <= self.warmup_ratio <= 1:
            raise _FieldError("warmup_ratio", f"must be in [0, 1], got {self.warmup_ratio}")
        if self.max_length < 2:
            raise _FieldError("max_length", f"must be at least 2, got {self.max_length}")
        if self.floor > 1:
            raise _FieldError("floor", f"must be at most 1, got {self.floor}")
        for key in ("gamma", "weight_decay", "max_grad_norm", "save_steps"):
            if getattr(self, key) < 0:
                raise _FieldError(key, f"must be ≥ 0, got {getattr(self, key)}")
        _check_prompt(self.prompt_template, self.prompt_preset)
        if self.eos_token is not None and not self.eos_token:
            raise _FieldError("eos_token", "must not be empty")

    @property
    def template(self) -> str | None:
        """The ``{instruction}`` template that formats prompts (a preset's), or None for the chat template."""
        return _prompt_template(self.prompt_template, self.prompt_preset)

    @property
    def out_path(self) -> Path:
        return Path(self.out).expanduser().resolve()

    @property
    def checkpoint_root(self) -> Path:
        """Checkpoints live beside the output, which appears only when training is complete."""
        out = self.out_path
        return out.parent / f"{out.name}.checkpoints"


FieldDoc = tuple[str, Any, str, tuple[str, ...]]


def field_docs(cls: type[_Config]) -> list[FieldDoc]:
    """``(name, default, help, extra flags)`` of every option, for the CLI's flags and ``--help``."""
    return [(f.name, f.default, f.metadata["help"], f.metadata.get("aliases", ())) for f in dataclasses.fields(cls)]


def metavar(cls: type[_Config], name: str) -> str | None:
    return next(f.metadata.get("metavar") for f in dataclasses.fields(cls) if f.name == name)


def load_train_section(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The ``train:`` mapping of a YAML file and the folder its relative paths resolve against."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise GiftMergeError(f"{path}: cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise GiftMergeError(f"{path}: not UTF-8 (byte at offset {exc.start}); save the file as UTF-8") from None
    except yaml.YAMLError as exc:
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise GiftMergeError(f"{path}: invalid YAML: {problem}") from exc
    section = document.get("train") if isinstance(document, dict) else None
    if not isinstance(section, dict):
        raise GiftMergeError(f"{path}: expected a mapping with a `train:` section")
    return section, path.resolve().parent


def train_config_from_yaml(path: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file's ``train:`` section, with CLI ``overrides`` on top."""
    section, folder = load_train_section(path)
    config = TrainConfig.from_mapping(section, where=f"{path}: train", folder=folder)
    if overrides:
        values = {**dataclasses.asdict(config), **overrides}
        for key, other in _ALTERNATIVES.items():  # a flag replaces the file's other spelling of it
            if key in overrides and other not in overrides:
                values[other] = None
        return TrainConfig.from_mapping(values)
    return config
