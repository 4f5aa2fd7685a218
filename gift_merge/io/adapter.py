"""PEFT LoRA adapters as exact, per-tensor weight deltas.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) is read like a checkpoint:
headers first, tensors on demand. Each target weight gets one :class:`Patch` that knows how peft's
``merge_and_unload`` would change it (plain LoRA, embedding LoRA, LoRA bias, DoRA, ``modules_to_save``)
and computes that change in fp32 from the adapter's small matrices, one tensor at a time. Anything that
cannot be applied exactly is an error naming the module, never a silent skip.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gift_merge.engine.floatbits import to_math
from gift_merge.errors import GiftMergeError
from gift_merge.io.reader import CheckpointReader, pickle_allowed
from gift_merge.lazy import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector(?:\.weight)?)$"
)
# Keys of adapter_config.json that change what a merge computes, and the values we can apply exactly.
_UNSUPPORTED = {
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "layer replication",
}

PatchKind = Literal["lora", "embedding", "bias", "dora", "replace"]


@dataclass(frozen=True)
class Patch:
    """How one target tensor changes; ``a``/``b``/``extra`` name tensors inside the adapter file."""

    kind: PatchKind
    module: str
    scale: float = 1.0
    a: str | None = None
    b: str | None = None
    extra: str | None = None  # DoRA magnitude vector, LoRA bias, or the modules_to_save tensor
    fan_in_fan_out: bool = False
    base_layer: str | None = None  # a saved copy of the layer's own weight, which peft loads over the model's

    @property
    def additive(self) -> bool:
        """Whether the change is independent of the weight it lands on (plain LoRA, embedding, bias)."""
        return self.kind in ("lora", "embedding", "bias") and self.base_layer is None


def is_adapter_folder(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file()


class AdapterReader:
    """One PEFT LoRA adapter folder, validated on open and read lazily."""

    def __init__(self, folder: str | Path, label: str | None = None) -> None:
        self.folder = Path(folder)
        self.label = label or str(folder)
        self.config = self._read_config()
        if not (self.folder / WEIGHTS_NAME).is_file():
            found = [p.name for p in self.folder.glob("adapter_model*")]
            if not (found and pickle_allowed()):
                hint = (
                    f" (found {found[0]}: pass --allow-pickle if you trust it, or re-save with safetensors)"
                    if found
                    else ""
                )
                raise GiftMergeError(f"{self.folder}: no {WEIGHTS_NAME}{hint}")
        self._tensors = CheckpointReader(self.folder)
        self.patches = self._build_patches()

    @property
    def base_model_name(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return str(value) if value else None

    def _read_config(self) -> dict[str, Any]:
        path = self.folder / CONFIG_NAME
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise GiftMergeError(f"{path}: not a readable adapter config ({exc})") from exc
        peft_type = str(config.get("peft_type", "")).upper()
        if peft_type != "LORA":
            raise GiftMergeError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
        for key, what in _UNSUPPORTED.items():
            if config.get(key):
                raise GiftMergeError(f"{path}: {what} ({key}) cannot be merged exactly yet")
        return config

    def _scale(self, module: str, rank: int) -> float:
        cfg = self.config
        rank_pattern: Mapping[str, int] = cfg.get("rank_pattern") or {}
        alpha_pattern: Mapping[str, float] = cfg.get("alpha_pattern") or {}
        r = rank_pattern[key] if (key := pattern_key(rank_pattern, module)) is not None else cfg.get("r", rank)
        alpha = alpha_pattern[key] if (key := pattern_key(alpha_pattern, module)) is not None else cfg["lora_alpha"]
        if r != rank:
            raise GiftMergeError(f"{self.folder}: module {module} has rank {rank} in its tensors but {r} in the config")
        return float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)

    def _build_patches(self) -> dict[str, Patch]:
        """Module name (as in the model, e.g. ``model.layers.0.mlp.up_proj``) → what merging does to it."""
        parts: dict[str, dict[str, str]] = {}
        replaced: dict[str, str] = {}
        for key in self._tensors.names:
            if not key.startswith(PREFIX):
                raise GiftMergeError(f"{self.folder}: tensor {key} does not start with {PREFIX!r}")
            inner = key[len(PREFIX) :]
            match = _LORA_KEY.match(inner)
            if match:
                parts.setdefault(match["module"], {})[match["part"].removesuffix(".weight")] = key
            else:
                replaced[inner] = key  # modules_to_save, or a saved embedding layer: full tensors
        fan = bool(self.config.get("fan_in_fan_out"))
        dora = bool(self.config.get("use_dora"))
        patches: dict[str, Patch] = {}
        for module, found in sorted(parts.items()):
            if "lora_embedding_A" in found or "lora_embedding_B" in found:
                a, b = found.get("lora_embedding_A"), found.get("lora_embedding_B")
                kind: PatchKind = "embedding"
            else:
                a, b, kind = found.get("lora_A"), found.get("lora_B"), "lora"
            if a is None or b is None:
                raise GiftMergeError(f"{self.folder}: module {module} has only one of its LoRA A/B matrices")
            rank = self._tensors.info(a).shape[0]
            scale = self._scale(module, rank)
            if dora:
                if kind == "embedding" or "lora_magnitude_vector" not in found:
                    raise GiftMergeError(
                        f"{self.folder}: module {module}: DoRA needs a magnitude vector on a linear layer"
                    )
                patches[f"{module}.weight"] = Patch("dora", module, scale, a, b, found["lora_magnitude_vector"], fan)
            else:
                patches[f"{module}.weight"] = Patch(kind, module, scale, a, b, fan_in_fan_out=fan)
            if "lora_B.bias" in found:
                patches[f"{module}.bias"] = Patch("bias", module, scale, extra=found["lora_B.bias"])
        for target, key in list(replaced.items()):
            if target.endswith(".base_layer.weight"):
                # peft saves whole embedding layers it targets (save_embedding_layers="auto") and loads them
                # over the model's own before merging; reproduce that, and say so in the delta
                owner = target.removesuffix(".base_layer.weight") + ".weight"
                if owner not in patches:
                    raise GiftMergeError(f"{self.folder}: {target} belongs to no LoRA module")
                patches[owner] = replace(patches[owner], base_layer=key)
                del replaced[target]
        for target, key in replaced.items():
            if target in patches:
                raise GiftMergeError(f"{self.folder}: {target} is both a LoRA target and a module to save")
            patches[target] = Patch("replace", target.rsplit(".", 1)[0], extra=key)
        return patches

    def read(self, name: str) -> torch.Tensor:
        return self._tensors.read(name)

    def factor(self, name: str | None, part: tuple[slice, ...], dtype: Any) -> Any:
        """Part of one tensor of the adapter file, widened to ``dtype``: a numpy dtype gives a numpy array
        (the CPU's merge path, no torch), a torch dtype a tensor on the CPU (the caller moves it)."""
        info = self._tensors.info(name or "")
        if isinstance(dtype, np.dtype):
            return to_math(self._tensors.read_array(info.name)[part], info.dtype, dtype)
        return self._tensors.read(info.name)[part].to(dtype)

    def check_against(self, shapes: Mapping[str, tuple[int, ...]], model_label: str) -> dict[str, Patch]:
        """Map every patch onto ``model_label``'s tensors; missing targets and shape mismatches are errors.

        A tied model keeps no ``lm_head.weight``: a patch on ``lm_head`` then lands on the input
        embedding it shares, as peft's in-place merge on the tied parameter does.
        """
        mapped: dict[str, Patch] = {}
        for target, patch in self.patches.items():
            name = target
            if name not in shapes and name.endswith("lm_head.weight"):
                tied = [n for n in shapes if n.endswith(("embed_tokens.weight", "wte.weight"))]
                name = tied[0] if len(tied) == 1 else name
            if name not in shapes:
                raise GiftMergeError(
                    f"adapter {self.label}: module {patch.module} has no tensor {target} in {model_label}"
                )
            expected = shapes[name]
            got = self._patch_shape(patch)
            if got is not None and tuple(got) != tuple(expected):
                raise GiftMergeError(
                    f"adapter {self.label}: module {patch.module} changes {list(got)} but {model_label}'s {name} "
                    f"is {list(expected)}"
                )
            if name in mapped:
                raise GiftMergeError(f"adapter {self.label}: two modules change {name} in {model_label}")
            mapped[name] = patch
        return mapped

    def _patch_shape(self, patch: Patch) -> tuple[int, ...] | None:
        info = self._tensors.info
        if patch.kind in ("lora", "dora", "embedding"):
            a, b = info(patch.a or "").shape, info(patch.b or "").shape
            if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                raise GiftMergeError(
                    f"adapter {self.label}: module {patch.module} has inconsistent A {list(a)} and B {list(b)}"
                )
            out = (b[0], a[1])
            return (out[1], out[0]) if patch.kind == "embedding" or patch.fan_in_fan_out else out
        return info(patch.extra or "").shape


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """peft's rule: a key matches a module name as a regex on its dotted suffix; the first match wins."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None
