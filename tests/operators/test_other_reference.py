"""linear, model_stock, nearswap, sce and passthrough against float64 references written out in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gift_merge.operators import OPERATORS

from .operator_testing import SEEDS, SHAPES, apply, assert_matches, f64, make_inputs, random_case, random_weights


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_linear(shape: tuple[int, ...], seed: int) -> None:
    op = OPERATORS["linear"]
    _, models = random_case(shape, 3, seed)
    weights = random_weights(3, seed)
    weights[1] = -0.3
    values = [{"weight": w} for w in weights]
    weighted = sum(w * f64(m) for w, m in zip(weights, models, strict=True))
    assert_matches(apply(op, make_inputs(op, models, None, values)), weighted / sum(weights))
    assert_matches(apply(op, make_inputs(op, models, None, values, {"normalize": False})), weighted)


def model_stock_reference(base: np.ndarray, models: list[np.ndarray], filter_wise: bool) -> np.ndarray:
    rows = filter_wise and base.ndim >= 2
    b = base.reshape(-1, base.shape[-1]) if rows else base.reshape(1, -1)
    ws = [m.reshape(b.shape) for m in models]
    n = len(ws)
    out = np.empty_like(b)
    for r in range(b.shape[0]):
        offsets = [w[r] - b[r] for w in ws]
        cosines = []
        for i in range(n):
            for j in range(i + 1, n):
                denom = max(np.linalg.norm(offsets[i]) * np.linalg.norm(offsets[j]), 1e-6)
                cosines.append(min(1.0, max(-1.0, offsets[i] @ offsets[j] / denom)))
        cos = np.mean(cosines)
        t = n * cos / (1 + (n - 1) * cos)
        out[r] = t * np.mean([w[r] for w in ws], axis=0) + (1 - t) * b[r]
    return out.reshape(base.shape)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [2, 3])
def test_model_stock(n: int, shape: tuple[int, ...], seed: int) -> None:
    op = OPERATORS["model_stock"]
    base, models = random_case(shape, n, seed)
    for filter_wise in (False, True):
        out = apply(op, make_inputs(op, models, base, global_values={"filter_wise": filter_wise}))
        assert_matches(out, model_stock_reference(f64(base), [f64(m) for m in models], filter_wise))


def test_model_stock_two_models_by_hand() -> None:
    op = OPERATORS["model_stock"]
    base = torch.zeros(2)
    models = [torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5 * math.sqrt(3)])]  # 60° apart: cos = ½
    t = 2 * 0.5 / (1 + 0.5)
    expected = t * (f64(models[0]) + f64(models[1])) / 2
    assert_matches(apply(op, make_inputs(op, models, base)), expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_nearswap(shape: tuple[int, ...], seed: int) -> None:
    op = OPERATORS["nearswap"]
    base, (model,) = random_case(shape, 1, seed)
    a, b = f64(base), f64(model)
    for t in (0.0, 1e-3, 0.2, 0.7, 10.0):
        weight = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0, 1)
        out = apply(op, make_inputs(op, [model], base, global_values={"t": t}))
        assert_matches(out, weight * b + (1 - weight) * a)
    assert torch.equal(apply(op, make_inputs(op, [model], base, global_values={"t": 0.0})), base)


def sce_reference(base: np.ndarray, models: list[np.ndarray], select_topk: float) -> np.ndarray:
    taus = np.stack([m - base for m in models])  # (n, *shape)
    if select_topk < 1:
        var = taus.var(axis=0)  # population variance across models
        k = int(np.count_nonzero(var) * select_topk)
        keep = np.zeros(var.size, dtype=bool)
        keep[np.argsort(-var.ravel(), kind="stable")[:k]] = True
        taus = taus * keep.reshape(var.shape)
    energy = np.array([np.mean(t**2) for t in taus])
    omega = energy / energy.sum() if energy.sum() > 0 else np.full(len(taus), 1 / len(taus))
    sigma = np.where(taus.sum(axis=0) >= 0, 1.0, -1.0)  # elected on the unweighted task vectors
    agree = np.sign(taus) == sigma
    numerator = sum(o * a * t for o, a, t in zip(omega, agree, taus, strict=True))
    divisor = sum(o * a for o, a in zip(omega, agree, strict=True))
    return base + numerator / np.where(divisor == 0, 1.0, divisor)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_sce(shape: tuple[int, ...], seed: int) -> None:
    op = OPERATORS["sce"]
    base, models = random_case(shape, 3, seed)
    models[2] = base + 0.01 * (models[2] - base)  # a low-energy model: small ω
    for select_topk in (1.0, 0.7, 0.2):
        out = apply(op, make_inputs(op, models, base, global_values={"select_topk": select_topk}))
        assert_matches(out, sce_reference(f64(base), [f64(m) for m in models], select_topk))


def test_sce_weights_small_deltas_by_energy() -> None:
    """Fine-tuning-sized deltas (mean square ≪ 1e-6): mergekit would fall back to uniform ω here."""
    op = OPERATORS["sce"]
    base = torch.zeros(4)
    models = [torch.full((4,), 1e-4), torch.full((4,), 3e-4)]
    omega = np.array([1.0, 9.0]) / 10
    expected = (omega[0] * 1e-4 + omega[1] * 3e-4) / omega.sum()
    assert apply(op, make_inputs(op, models, base)).tolist() == pytest.approx([expected] * 4, rel=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_passthrough(shape: tuple[int, ...]) -> None:
    op = OPERATORS["passthrough"]
    _, (model,) = random_case(shape, 1, 0)
    for scale in (1.0, 0.0, -2.5):
        assert_matches(apply(op, make_inputs(op, [model], None, [{"scale": scale}])), scale * f64(model))
