"""The GIFT loss of one micro-batch, L = Σ w_t·ℓ_t / Σ w_t, without materialising full fp32 logits.

A 152k-token vocabulary makes the logits the largest activation of a small model: ~2.5 GB per fp32
copy for a batch of 4 × 1024 tokens, and the usual path keeps several (bf16 logits, their fp32 upcast,
the softmax for the backward). :class:`ChunkedLinearCrossEntropy` instead takes the hidden states of
the target positions only, and for one chunk of rows at a time computes the logits, the loss and, right
away, the gradient with respect to the hidden states: the backward then only hands back a stored
(N, H) tensor, so nothing is recomputed and at most one (chunk, V) fp32 block is alive. The loss is
linear in the per-token coefficients, which is what allows the gradient to be taken early.

Gradient accumulation (see :func:`micro_batch_scale`): each micro-batch loss is the weighted mean
above, as in the authors' ``EnhancedTrainer``; an optimizer step's gradient is the *mean* of its
micro-batch losses over all micro-batches of all ranks. The authors' transformers 4.51 run summed them
instead (64 × a mean): same direction, but our gradient norm is that of a mean, so clipping at 1.0
means what it says.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gift_merge.train.weights import IGNORE_INDEX

CHUNK_BYTES = 1 << 28
"""Budget for one fp32 (rows, vocab) block of logits: 256 MiB, ~440 rows of a 152k vocabulary."""


def chunk_rows(vocab_size: int, budget: int = CHUNK_BYTES) -> int:
    return max(1, budget // (4 * vocab_size))


def token_coefficients(weights: torch.Tensor) -> torch.Tensor:
    """``w / Σ w``: the weighted mean's coefficients (the authors fall back to a plain mean if Σ w ≤ 1e-8)."""
    total = weights.sum()
    if total <= 1e-8:
        return torch.full_like(weights, 1.0 / max(weights.numel(), 1))
    return weights / total


def micro_batch_scale(micro_batches_in_step: int, world_size: int) -> float:
    """Factor on a micro-batch's loss before ``backward`` so a step's gradient is the mean micro-batch loss.

    DistributedDataParallel averages gradients over ranks, so each rank scales by ``world / n`` where
    ``n`` counts the step's micro-batches on all ranks; a single process scales by ``1 / n``.
    """
    return world_size / micro_batches_in_step


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``Σ_i c_i · CE(h_i Wᵀ + b, y_i)`` over rows ``h`` (N, H), chunk by chunk, gradient taken in forward.

    ``W`` and ``b`` must not need gradients (LoRA leaves the output head frozen); ``c`` is a constant.
    Logits are computed in the hidden states' dtype, as the model's own head would, then upcast per chunk.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        coef: torch.Tensor,
        rows: int,
    ) -> torch.Tensor:
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs (tests)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start : start + rows]  # (n, H)
            y = labels[start : start + rows, None]  # (n, 1)
            c = coef[start : start + rows, None].to(acc)  # (n, 1)
            logits = F.linear(h, weight, bias).to(acc)  # (n, V)
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
            total += (c * (lse - logits.gather(1, y))).sum()
            if grad_hidden is not None:
                # dℓ/dlogits = softmax − onehot, computed in place in the one fp32 block we hold.
                grad_logits = logits.sub_(lse).exp_()
                grad_logits.scatter_add_(1, y, torch.full_like(c, -1.0))
                grad_logits.mul_(c)
                grad_hidden[start : start + rows] = grad_logits.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_hidden,) = ctx.saved_tensors
        grad = None if grad_hidden is None else grad_hidden * grad_output.to(grad_hidden.dtype)
        return grad, None, None, None, None, None


def weighted_token_loss(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """``Σ c_i · ℓ_i`` for hidden states (N, H) of the target rows, through the output ``head``.

    A plain frozen ``nn.Linear`` head takes the chunked path; anything else (a head with trainable
    parameters, e.g. LoRA on ``lm_head``) gets ordinary logits and cross-entropy.
    """
    weight = getattr(head, "weight", None)
    if type(head) is nn.Linear and weight is not None and not weight.requires_grad:
        bias = head.bias
        if bias is not None and bias.requires_grad:
            raise ValueError("a trainable head bias needs the plain path")
        rows = chunk_rows(weight.shape[0])
        out = ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, coef, rows)
        return out
    logits = head(hidden).float()  # (N, V)
    losses = F.cross_entropy(logits, labels, reduction="none")
    return (coef.float() * losses).sum()


def select_targets(hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rows of ``hidden`` (B, T, H) that predict something, with their labels and weights, flattened."""
    mask = labels != IGNORE_INDEX  # (B, T)
    return hidden[mask], labels[mask], weights[mask]  # (N, H), (N,), (N,)
