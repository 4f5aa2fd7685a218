"""Which modules get LoRA factors, decided from module names alone.

Training decides on the loaded model; a recipe's ``train:`` stage decides on the base model's tensor
names before anything is trained, so that the merge stages after it can be planned up front. Both go
through :func:`choose_targets`, so the plan and the trained adapter name the same modules.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping

from gift_merge.errors import GiftMergeError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The paper's LoRA targets: every attention and MLP projection of Llama, Qwen2, Mistral …"""

EQUIVALENT_TARGETS: tuple[tuple[str, ...], ...] = (
    DEFAULT_TARGETS,
    ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),  # Phi-3
    ("c_attn", "c_proj", "c_fc"),  # GPT-2 (Conv1D)
    ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),  # GPT-NeoX, Falcon, Bloom
    ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),  # OPT, Phi-2
    ("Wqkv", "out_proj", "fc1", "fc2"),  # MPT-style fused attention
)
"""Per architecture family, the names that cover all attention and MLP projections; first match wins."""

OUTPUT_HEAD = "lm_head"


def choose_targets(
    leaves: Collection[str], requested: Iterable[str] | None, model_label: str, key: str = "--targets"
) -> list[str]:
    """Target leaf names among ``leaves`` (the last name component of every linear layer).

    Without ``requested``: the first family of :data:`EQUIVALENT_TARGETS` with at least two names
    present. Requested names must each name a linear layer (or the output head).
    """
    if requested is not None:
        names = list(requested)
        missing = [n for n in names if n not in leaves and n != OUTPUT_HEAD]
        if missing:
            raise GiftMergeError(
                f"{key}: no linear module named {missing[0]!r} in {model_label} (have: {', '.join(sorted(leaves))})"
            )
        return names
    for family in EQUIVALENT_TARGETS:
        names = [n for n in family if n in leaves]
        if len(names) >= 2:
            return names
    raise GiftMergeError(
        f"cannot guess LoRA targets for {model_label}; pass {key} (linear modules: {', '.join(sorted(leaves))})"
    )


def matrices(shapes: Mapping[str, tuple[int, ...]]) -> Iterator[tuple[str, str]]:
    """``(module, leaf name)`` of every module that owns a 2-D ``weight`` (linear layers and embeddings)."""
    for name, shape in shapes.items():
        if name.endswith(".weight") and len(shape) == 2:
            module = name.removesuffix(".weight")
            yield module, module.rsplit(".", 1)[-1]


def leaf_names_from_tensors(shapes: Mapping[str, tuple[int, ...]]) -> set[str]:
    """Leaf names of the modules with a 2-D ``weight``, without the output head."""
    return {leaf for _, leaf in matrices(shapes)} - {OUTPUT_HEAD}
