"""slerp, nuslerp, multislerp and karcher against float64 references written out in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gift_merge.errors import GiftMergeError
from gift_merge.operators import OPERATORS

from .operator_testing import SEEDS, SHAPES, apply, assert_matches, f64, make_inputs, random_case


def slerp_reference(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    a, b = v0.ravel(), v1.ravel()
    ua = a / np.linalg.norm(a) if np.linalg.norm(a) > 1e-8 else a
    ub = b / np.linalg.norm(b) if np.linalg.norm(b) > 1e-8 else b
    d = float(ua @ ub)
    if abs(d) > 0.9995:
        return (1 - t) * v0 + t * v1
    omega = math.acos(d)
    return (math.sin((1 - t) * omega) * v0 + math.sin(t * omega) * v1) / math.sin(omega)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_slerp(shape: tuple[int, ...], seed: int) -> None:
    op = OPERATORS["slerp"]
    for spread in (0.3, 2.0):
        base, (model,) = random_case(shape, 1, seed, spread=spread)
        for t in (0.0, 0.25, 0.8, 1.0):
            out = apply(op, make_inputs(op, [model], base, global_values={"t": t}))
            assert_matches(out, slerp_reference(t, f64(base), f64(model)))
        assert torch.equal(apply(op, make_inputs(op, [model], base, global_values={"t": 0.0})), base)


def test_slerp_near_parallel_falls_back_to_lerp() -> None:
    op = OPERATORS["slerp"]
    base, _ = random_case((20, 30), 1, seed=0)
    g = torch.Generator().manual_seed(9)
    model = 1.7 * base + 0.01 * torch.randn(base.shape, generator=g)  # cos ≈ 0.99998
    out = apply(op, make_inputs(op, [model], base, global_values={"t": 0.4}))
    assert_matches(out, 0.6 * f64(base) + 0.4 * f64(model))
    close = base + 0.1 * torch.randn(base.shape, generator=g)  # cos ≈ 0.995: still a true slerp
    out = apply(op, make_inputs(op, [close], base, global_values={"t": 0.4}))
    assert_matches(out, slerp_reference(0.4, f64(base), f64(close)))
    assert not np.allclose(f64(out), 0.6 * f64(base) + 0.4 * f64(close), rtol=1e-5, atol=0)
    opposite = -base  # antiparallel: also the lerp branch, not a division by sin π
    out = apply(op, make_inputs(op, [opposite], base, global_values={"t": 0.5}))
    assert_matches(out, np.zeros(base.shape))


def nuslerp_reference(t: float, a: np.ndarray, b: np.ndarray, flatten: bool, row_wise: bool) -> np.ndarray:
    if flatten or a.ndim < 2:
        axis, va, vb = None, a.reshape(1, -1), b.reshape(1, -1)
    else:
        axis = 0 if row_wise else a.ndim - 1
        va = np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis])
        vb = np.moveaxis(b, axis, -1).reshape(-1, b.shape[axis])
    out = np.empty_like(va)
    for i in range(va.shape[0]):
        x, y = va[i], vb[i]
        cos = (x / max(np.linalg.norm(x), 1e-7)) @ (y / max(np.linalg.norm(y), 1e-7))
        omega = math.acos(min(1.0, max(-1.0, cos)))
        if abs(math.sin(omega)) < 1e-8:
            out[i] = (1 - t) * x + t * y
        else:
            out[i] = (math.sin((1 - t) * omega) * x + math.sin(t * omega) * y) / math.sin(omega)
    if axis is None:
        return out.reshape(a.shape)
    moved = np.moveaxis(a, axis, -1).shape
    return np.moveaxis(out.reshape(moved), -1, axis)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [*SHAPES, (3, 4, 5)])
def test_nuslerp_options_with_and_without_base(shape: tuple[int, ...], seed: int) -> None:
    op = OPERATORS["nuslerp"]
    base, models = random_case(shape, 2, seed, spread=1.0)
    weights = [{"weight": 0.3}, {"weight": 0.9}]
    t = 0.9 / 1.2
    for flatten in (True, False):
        for row_wise in (False, True):
            options = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
            out = apply(op, make_inputs(op, models, None, weights, options))
            assert_matches(out, nuslerp_reference(t, f64(models[0]), f64(models[1]), flatten, row_wise))
            out = apply(op, make_inputs(op, models, base, weights, options))
            b = f64(base)
            expected = b + nuslerp_reference(t, f64(models[0]) - b, f64(models[1]) - b, flatten, row_wise)
            assert_matches(out, expected)


def test_nuslerp_row_wise_false_means_each_row() -> None:
    op = OPERATORS["nuslerp"]
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 3.0]])  # row 0 at 90°, row 1 parallel
    out = apply(op, make_inputs(op, [a, b], None, [{"weight": 1.0}, {"weight": 1.0}], {"nuslerp_flatten": False}))
    s = math.sin(math.pi / 4)
    assert out.flatten().tolist() == pytest.approx([s, s, 0.0, 2.5])


def test_nuslerp_zero_weight_sum_uses_half() -> None:
    op = OPERATORS["nuslerp"]
    _, models = random_case((6, 5), 2, seed=1, spread=1.0)
    even = apply(op, make_inputs(op, models, None, [{"weight": 1.0}, {"weight": 1.0}]))
    cancelling = apply(op, make_inputs(op, models, None, [{"weight": 1.0}, {"weight": -1.0}]))
    assert torch.allclose(even, cancelling)


def multislerp_reference(xs: list[np.ndarray], weights: list[float], normalize: bool, eps: float) -> np.ndarray:
    w = np.array(weights) / (sum(weights) if normalize else 1.0)
    flat = [x.ravel() for x in xs]
    norms = np.array([np.linalg.norm(x) for x in flat])
    units = [x / (n + eps) for x, n in zip(flat, norms, strict=True)]
    mean = sum(wi * u for wi, u in zip(w, units, strict=True))
    mean = mean / np.linalg.norm(mean)
    tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units, strict=True))
    angle = np.linalg.norm(tangent) + eps
    direction = mean * math.cos(angle) + tangent * math.sin(angle) / angle
    return (direction * float(w @ norms)).reshape(xs[0].shape)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_multislerp_with_and_without_base(shape: tuple[int, ...], seed: int) -> None:
    op = OPERATORS["multislerp"]
    base, models = random_case(shape, 3, seed, spread=1.0)
    weights = [0.5, 0.2, 0.9]
    for normalize in (True, False):
        values = [{"weight": w} for w in weights]
        options = {"normalize_weights": normalize}
        out = apply(op, make_inputs(op, models, None, values, options))
        assert_matches(out, multislerp_reference([f64(m) for m in models], weights, normalize, 1e-8))
        out = apply(op, make_inputs(op, models, base, values, options))
        b = f64(base)
        assert_matches(out, b + multislerp_reference([f64(m) - b for m in models], weights, normalize, 1e-8))


def test_multislerp_antipodal_inputs() -> None:
    op = OPERATORS["multislerp"]
    x = torch.tensor([1.0, -2.0, 0.5])
    two = apply(op, make_inputs(op, [x, -x], None, [{"weight": 1.0}, {"weight": 1.0}]))
    assert torch.allclose(two, torch.zeros(3))  # fallback: the linear combination
    with pytest.raises(GiftMergeError, match="weighted mean direction of t9 is zero"):
        apply(op, make_inputs(op, [x, -x, x, -x], None, [{"weight": 1.0}] * 4, name="t9"))
    assert torch.equal(apply(op, make_inputs(op, [x], None, [{"weight": 0.3}])), x)


def karcher_reference(xs: list[np.ndarray], max_iter: int, tol: float) -> np.ndarray:
    flat = [x.ravel() for x in xs]
    norms = [np.linalg.norm(x) for x in flat]
    units = [x / n for x, n in zip(flat, norms, strict=True) if n > tol]
    alpha = 1.0 / len(units)
    u = sum(alpha * v for v in units)
    u = units[0] if np.linalg.norm(u) < tol else u / np.linalg.norm(u)
    for _ in range(max_iter):
        tangent = np.zeros_like(u)
        for v in units:
            c = float(np.clip(u @ v, -1, 1))
            phi = math.acos(c)
            if phi >= tol:
                tangent += alpha * phi / math.sin(phi) * (v - c * u)
        size = np.linalg.norm(tangent)
        if size < tol:
            break
        u = math.cos(size) * u + math.sin(size) * tangent / size
        u = u / np.linalg.norm(u)
    return (np.mean(norms) * u).reshape(xs[0].shape)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_karcher(shape: tuple[int, ...], seed: int) -> None:
    op = OPERATORS["karcher"]
    _, models = random_case(shape, 3, seed, spread=1.0)
    models[1] = models[1] * 3.0  # different norms: the scale is their mean
    for options in ({}, {"max_iter": 1}, {"max_iter": 50, "tol": 1e-7}):
        out = apply(op, make_inputs(op, models, None, global_values=options))
        expected = karcher_reference([f64(m) for m in models], options.get("max_iter", 10), options.get("tol", 1e-5))
        assert_matches(out, expected)


def test_karcher_zero_tensor_counts_in_the_scale_only() -> None:
    op = OPERATORS["karcher"]
    x = torch.tensor([3.0, 4.0])
    out = apply(op, make_inputs(op, [x, torch.zeros(2), 2 * x], None))
    # direction of the two non-zero inputs is x/5; scale (5 + 0 + 10)/3
    assert out.tolist() == pytest.approx([3.0, 4.0])
    assert torch.equal(apply(op, make_inputs(op, [torch.zeros(2), torch.zeros(2)], None)), torch.zeros(2))
