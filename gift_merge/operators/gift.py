"""GIFT transfer: add adapters' weight deltas to the model that receives them.

    θ' = θ_I + Σ_i λ_i · ΔW_i,    ΔW_i = s_i · B_i A_i  (s = α/r, or α/√r with rsLoRA)

The last step of GIFT (Ruan et al., ACL 2026, https://arxiv.org/abs/2605.01256): a LoRA adapter trained
on the base model, guided by the instruction-tuned model's token confidences, is merged into the
instruction-tuned model θ_I. With λ = 1 and one adapter this is exactly peft's ``merge_and_unload`` on
θ_I (plain "LoRA transfer" / Shadow-FT when the adapter was trained without confidence weights). Each
ΔW arrives exact from the adapter's factors, is added in fp32 and rounded once. For DoRA and
``modules_to_save`` adapters, ΔW is the change peft's merge makes to θ_I itself, so λ interpolates
between θ_I (λ = 0) and peft's result (λ = 1).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from gift_merge.operators.base import MergeInputs, Operator, Param, elementwise


def _gift(inputs: MergeInputs[Any]) -> Any:
    """θ + Σ λ·ΔW for torch tensors and numpy arrays alike: λ·ΔW is rounded before the sum (no fused
    multiply-add, which numpy lacks), so both engines give the same bits."""
    if inputs.base is None:
        raise ValueError("gift needs the receiving model's tensor as its base")
    result = inputs.base
    for delta, params in zip(inputs.tensors, inputs.model_params, strict=True):
        weight = float(params["weight"])
        result = result + (delta if weight == 1 else delta * weight)
    return result


GIFT = Operator(
    name="gift",
    merge=elementwise(_gift),
    params=(Param("weight", 1.0, per_model=True, doc="λ, the scale of this adapter's delta"),),
    base="required",
    min_models=1,
    deltas=True,
    summary="θ_base + Σ λ·ΔW: transfer LoRA adapters (GIFT, LoRA transfer) into base_model",
    paper="https://arxiv.org/abs/2605.01256",
    elementwise=True,
)
LORA_TRANSFER = replace(GIFT, name="lora_transfer", summary="alias of gift")
