"""What peft's ``merge_and_unload`` does to one weight, written once over the backend.

    LoRA:        W' = W + ΔW,   ΔW = s · B A      (B: out × r, A: r × in; s = α/r, or α/√r with rsLoRA)
    embedding LoRA, GPT-2 Conv1D (``fan_in_fan_out``): the weight is stored (in, out), so ΔW is (s · B A)ᵀ
    LoRA bias:   b' = b + s · b_B
    DoRA:        W' = m ⊙ (W + ΔW) / ‖W + ΔW‖      (‖·‖ of each output row, over the inputs; m the magnitude)
    modules_to_save: W' = the saved tensor;  a saved base layer replaces W before its patch applies

Hu et al., "LoRA", https://arxiv.org/abs/2106.09685 ; Liu et al., "DoRA", https://arxiv.org/abs/2402.09353

The additive kinds (LoRA, embedding, bias) form ΔW from the factors for any block of rows, so an
elementwise merge never holds more than a block of it. DoRA, ``modules_to_save`` and saved base layers
change a weight relative to itself: they are formed on the whole weight, and a method that needs only the
change (GIFT's ``deltas``) gets W' − W, taken in float64 so that nothing is lost to the subtraction.
``io/adapter.py`` parses the adapter into :class:`~gift_merge.io.adapter.Patch` objects; the math is here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gift_merge.engine.backend import Backend
    from gift_merge.io.adapter import Patch

Factor = Callable[[str | None, tuple[slice, ...], Any], Any]
"""(name of a tensor in the adapter file, the part of it wanted, a dtype) → that part, widened to the dtype."""


def delta_rows(patch: Patch, rows: slice, factor: Factor, dtype: Any) -> Any:
    """Rows ``rows`` of an additive patch's ΔW in ``dtype``: only the part of each factor those rows need
    is read, and the product is taken in ``dtype``."""
    if not patch.additive:
        raise ValueError(f"module {patch.module}: only additive patches can be formed by rows")
    if patch.kind == "bias":
        return factor(patch.extra, (rows,), dtype) * patch.scale
    if patch.kind == "embedding" or patch.fan_in_fan_out:  # stored (in, out): its rows are columns of B·A
        return (factor(patch.b, (slice(None),), dtype) @ factor(patch.a, (slice(None), rows), dtype)).T * patch.scale
    return (
        factor(patch.b, (rows,), dtype) @ factor(patch.a, (slice(None),), dtype)
    ) * patch.scale  # (out, r) @ (r, in)


def patched(backend: Backend, patch: Patch, weight: Any, factor: Factor) -> Any:
    """The whole ``weight`` after the patch (of any kind), in ``weight``'s dtype."""
    whole = (slice(None),)
    if patch.kind == "replace":
        return factor(patch.extra, whole, weight.dtype)
    if patch.base_layer is not None:
        weight = factor(patch.base_layer, whole, weight.dtype)
    merged = weight + delta_rows(_as_lora(patch), slice(None), factor, weight.dtype)
    if patch.kind != "dora":
        return merged
    oriented = merged.T if patch.fan_in_fan_out else merged  # (out, in)
    magnitude = factor(patch.extra, whole, weight.dtype).reshape(-1, 1)
    result = (magnitude / backend.sqrt(backend.row_sums(oriented * oriented))) * oriented
    return result.T if patch.fan_in_fan_out else result


def change(backend: Backend, patch: Patch, weight: Any, factor: Factor) -> Any:
    """W' − W of a patch that changes the weight relative to itself, formed in float64, in ``weight``'s dtype."""
    wide = backend.astype(weight, "float64")
    return backend.astype(patched(backend, patch, wide, factor) - wide, weight.dtype)


def _as_lora(patch: Patch) -> Patch:
    """The additive part of a patch: its LoRA product without DoRA's rescale or a saved base layer."""
    from dataclasses import replace

    kind = "lora" if patch.kind == "dora" else patch.kind
    return replace(patch, kind=kind, extra=None if patch.kind == "dora" else patch.extra, base_layer=None)
