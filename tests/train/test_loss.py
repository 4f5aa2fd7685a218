"""The chunked linear + cross-entropy equals the plain formula, value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gift_merge.train.loss import (
    ChunkedLinearCrossEntropy,
    micro_batch_scale,
    token_coefficients,
    weighted_token_loss,
)


def _reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """L = Σ w_t·ℓ_t / Σ w_t, written plainly."""
    losses = F.cross_entropy(hidden @ weight.T, labels, reduction="none")
    return (w * losses).sum() / w.sum()


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_chunked_matches_plain_cross_entropy(rows: int) -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 50, (10,), generator=gen)
    w = torch.rand(10, dtype=torch.float64, generator=gen).clamp(min=1e-4)

    expected = _reference(hidden, weight, labels, w)
    (grad_expected,) = torch.autograd.grad(expected * 3.0, hidden)
    got = ChunkedLinearCrossEntropy.apply(hidden, weight, None, labels, token_coefficients(w), rows)
    (grad_got,) = torch.autograd.grad(got * 3.0, hidden)

    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-10, atol=1e-12)


def test_head_with_bias_and_fallback_path_agree() -> None:
    torch.manual_seed(1)
    head = nn.Linear(8, 30)
    head.requires_grad_(False)
    hidden = torch.randn(7, 8, requires_grad=True)
    labels = torch.randint(0, 30, (7,))
    coef = token_coefficients(torch.rand(7))
    fused = weighted_token_loss(hidden, head, labels, coef)
    (grad_fused,) = torch.autograd.grad(fused, hidden)
    head.weight.requires_grad_(True)  # a trainable head takes the ordinary path
    plain = weighted_token_loss(hidden, head, labels, coef)
    (grad_plain,) = torch.autograd.grad(plain, hidden)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(grad_fused, grad_plain)


def test_coefficients_and_accumulation_scale() -> None:
    w = torch.tensor([0.5, 0.25, 1.0])
    assert token_coefficients(w).tolist() == pytest.approx([0.5 / 1.75, 0.25 / 1.75, 1 / 1.75])
    # The authors fall back to a plain mean when the weights vanish.
    assert token_coefficients(torch.zeros(4)).tolist() == [0.25] * 4
    # A step's gradient is the mean micro-batch loss: 1/n alone, world/n before DDP's average.
    assert micro_batch_scale(8, 1) == 1 / 8
    assert micro_batch_scale(8, 2) == 2 / 8


def test_fp32_accumulation_for_low_precision_inputs() -> None:
    hidden = torch.randn(4, 8, dtype=torch.bfloat16)
    weight = torch.randn(16, 8, dtype=torch.bfloat16)
    got = ChunkedLinearCrossEntropy.apply(hidden, weight, None, torch.arange(4), torch.full((4,), 0.25), 2)
    assert got.dtype == torch.float32
