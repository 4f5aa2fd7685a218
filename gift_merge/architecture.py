"""Where the transformer layers are in a checkpoint, learned from its tensor names and config.

Instead of one JSON description per architecture (mergekit keeps 62), the layout is inferred: layer
tensors are ``<prefix>.<index>.<suffix>`` for the one prefix whose indices run ``0 … n-1`` where ``n``
is the config's layer count. That covers Llama, Qwen2, Mistral, Gemma, GPT-2, GPT-NeoX, Phi and the
rest of the decoder-only families without a table to keep up to date.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gift_merge.errors import GiftMergeError

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_LAYER_NAME = re.compile(r"^(.+?)\.(\d+)\.(.+)$")
_EMBEDDING_MARKERS = ("embed", "wte", "wpe", "word_embeddings")
_VOCAB_MARKERS = ("embed_tokens", "wte", "word_embeddings", "lm_head", "embed_out")


@dataclass(frozen=True)
class LayerLayout:
    """``prefix`` (e.g. ``model.layers``) and the layer count, with the config key that holds it."""

    prefix: str | None
    num_layers: int
    count_key: str | None

    def split(self, name: str) -> tuple[int, str] | None:
        """``(index, suffix)`` for a layer tensor, ``None`` for embeddings, final norm, lm_head."""
        if self.prefix is None or not name.startswith(self.prefix + "."):
            return None
        match = _LAYER_NAME.match(name)
        if not match or match.group(1) != self.prefix:
            return None
        return int(match.group(2)), match.group(3)

    def name(self, index: int, suffix: str) -> str:
        return f"{self.prefix}.{index}.{suffix}"


def layer_count(config: Mapping[str, Any]) -> tuple[str, int] | None:
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return key, config[key]
    return None


def detect_layout(names: Iterable[str], config: Mapping[str, Any], label: str) -> LayerLayout:
    indices: dict[str, set[int]] = defaultdict(set)
    for name in names:
        match = _LAYER_NAME.match(name)
        if match:
            indices[match.group(1)].add(int(match.group(2)))
    counted = layer_count(config)
    if counted:
        key, n = counted
        for prefix, seen in indices.items():
            if seen == set(range(n)):
                return LayerLayout(prefix, n, key)
        if n == 0:
            return LayerLayout(None, 0, key)
        raise GiftMergeError(f"{label}: config.json says {key}={n}, but no tensor prefix has layers 0..{n - 1}")
    if not indices:
        return LayerLayout(None, 0, None)
    prefix, seen = max(indices.items(), key=lambda kv: len(kv[1]))
    return LayerLayout(prefix, max(seen) + 1, None)


def is_pre_weight(name: str) -> bool:
    """Embeddings come before the layers; everything else outside them (final norm, lm_head) after."""
    return any(marker in name for marker in _EMBEDDING_MARKERS)


def is_vocab_tensor(name: str) -> bool:
    """Tensors with one row per vocabulary entry, whose row counts may legitimately differ."""
    return any(marker in name for marker in _VOCAB_MARKERS)
