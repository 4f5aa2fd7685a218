"""The generalized-task-arithmetic family against float64 references written out in numpy.

Pruning is discontinuous, so the references rank the exact differences of the float32 inputs (float32
subtraction rounds monotonically, so the operator ranks them in the same order). Random operators are
checked two ways: exactly, by replaying the documented draw protocol (one float32 ``torch.rand`` of the
tensor's shape per model, in input order, from ``generator_for(seed, tensor name)``) into a numpy
reference of the formula; and statistically, on the operator's own output, against the distribution the
paper specifies, so that a wrong mask would fail even if the replay were wrong in the same way.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gift_merge.operators import OPERATORS

from .operator_testing import SEEDS, SHAPES, apply, assert_matches, f64, make_inputs, random_case, uniforms

NAME = "model.layers.3.self_attn.q_proj.weight"
GTA_OPS = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della"]
GTA_OPS += ["della_linear"]
CONSENSUS = {"ties", "dare_ties", "breadcrumbs_ties", "della"}


# ----------------------------------------------------------------------------- plain references


def keep_top(delta: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(-np.abs(delta).reshape(-1), kind="stable")  # ties: lower index first
    keep = np.zeros(delta.size, dtype=bool)
    keep[order[:k]] = True
    return keep.reshape(delta.shape)


def breadcrumbs_keep(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    n = delta.size
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    order = np.argsort(-np.abs(delta).reshape(-1), kind="stable")
    keep = np.zeros(n, dtype=bool)
    keep[order[n_top : n - n_bot]] = True  # mergekit's [n_bot:-n_top] on the ascending order, n_top = 0 fixed
    return keep.reshape(delta.shape)


def della_keep(delta: np.ndarray, u: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    rows = delta.reshape(-1, delta.shape[-1]) if delta.ndim > 1 else delta.reshape(1, -1)
    draws = u.reshape(rows.shape)
    keep = np.zeros(rows.shape, dtype=bool)
    for r in range(rows.shape[0]):
        n = rows.shape[1]
        rank = np.empty(n)
        rank[np.argsort(np.abs(rows[r]), kind="stable")] = np.arange(n)
        unit = rank / (n - 1) if n > 1 else np.full(n, 0.5)
        keep[r] = draws[r] < (density - epsilon) + 2 * epsilon * unit
    return keep.reshape(delta.shape)


def rescaled(delta: np.ndarray, keep: np.ndarray, rescale: bool) -> np.ndarray:
    kept = np.where(keep, delta, 0.0)
    before, after = np.abs(delta).sum(), np.abs(kept).sum()
    if not rescale or before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def prune(name: str, deltas: list[np.ndarray], model_params: list[dict], rescale: bool, seed: int) -> list:
    if name == "task_arithmetic":
        return deltas
    draws = uniforms(seed, NAME, deltas[0].shape, len(deltas))
    out = []
    for d, mp, u in zip(deltas, model_params, draws, strict=True):
        rho = mp["density"]
        if rho >= 1:
            out.append(d)
        elif name == "ties":
            out.append(rescaled(d, keep_top(d, int(rho * d.size)), rescale))
        elif name.startswith("dare"):
            out.append(rescaled(d, u < rho, rescale))
        elif name.startswith("breadcrumbs"):
            out.append(rescaled(d, breadcrumbs_keep(d, rho, mp["gamma"]), rescale))
        else:
            out.append(rescaled(d, della_keep(d, u, rho, mp["epsilon"]), rescale))
    return out


def gta_reference(name: str, base: torch.Tensor, models: list[torch.Tensor], mps: list, params: dict, seed: int):
    b = f64(base)
    deltas = prune(name, [f64(m) - b for m in models], mps, params["rescale"], seed)
    weights = [mp["weight"] for mp in mps]
    weighted = [w * d for w, d in zip(weights, deltas, strict=True)]
    if name in CONSENSUS:
        sigma = np.where(sum(weighted) >= 0, 1.0, -1.0)  # elected on the weighted deltas
        agree = [np.sign(x) == sigma for x in weighted]
        mixed = sum(np.where(a, x, 0.0) for a, x in zip(agree, weighted, strict=True))
        divisor = sum(a * w for a, w in zip(agree, weights, strict=True))
        divisor = np.where(divisor == 0, 1.0, divisor)
    else:
        mixed = sum(weighted)
        divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
    if params["normalize"]:
        mixed = mixed / divisor
    return b + params["lambda"] * mixed


# ----------------------------------------------------------------------------- reference tests


def variants(name: str) -> list[tuple[list[dict], dict]]:
    """(per-model values, global values) covering normalize on/off, lambda, rescale, negative weights."""
    op = OPERATORS[name]
    default = {p.name: p.default for p in op.global_params}
    per_model = [
        {"weight": 0.9, "density": 0.6, "gamma": 0.05, "epsilon": 0.1},
        {"weight": 0.4, "density": 0.3, "gamma": 0.0, "epsilon": 0.05},  # γ = 0: mergekit zeroes this
        {"weight": 1.1, "density": 0.9, "gamma": 0.1, "epsilon": 0.1},  # ρ + ε = 1
    ]
    if name == "task_arithmetic":
        per_model = [{k: v for k, v in mp.items() if k == "weight"} for mp in per_model]
    negative = [dict(mp) for mp in per_model]
    negative[1]["weight"] = -0.7
    flip_rescale = {} if name == "task_arithmetic" else {"rescale": not default["rescale"]}
    return [
        (per_model, {}),
        (per_model, {"normalize": not default["normalize"], "lambda": 0.7}),
        (negative, {**flip_rescale, "lambda": 1.3}),
        ([{**mp, "density": 1.0} for mp in per_model[:2]], {}),
        ([{**per_model[0], "density": 1.0}, *per_model[1:]], {}),  # an unpruned model still consumes its draw
    ]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", GTA_OPS)
def test_matches_float64_reference(name: str, shape: tuple[int, ...], seed: int) -> None:
    op = OPERATORS[name]
    for model_values, global_values in variants(name):
        base, models = random_case(shape, len(model_values), seed)
        inputs = make_inputs(op, models, base, model_values, global_values, seed=seed, name=NAME)
        expected = gta_reference(name, base, models, list(inputs.model_params), dict(inputs.params), seed)
        assert_matches(apply(op, inputs), expected)


def test_ties_elects_on_weighted_deltas() -> None:
    base = torch.zeros(1)
    models = [torch.tensor([1.0]), torch.tensor([-0.5])]
    # weighted: 0.2·1 − 1.0·0.5 < 0 elects −, so only model 2 counts: −0.5·1.0/1.0
    inputs = make_inputs(OPERATORS["ties"], models, base, [{"weight": 0.2}, {"weight": 1.0}])
    assert apply(OPERATORS["ties"], inputs).tolist() == [-0.5]  # the paper's unweighted vote gives +1.0
    flipped = make_inputs(OPERATORS["ties"], models, base, [{"weight": 0.2}, {"weight": -1.0}])
    # a negative weight flips model 2's vote: weighted deltas +0.2 and +0.5 both agree
    assert apply(OPERATORS["ties"], flipped).tolist() == pytest.approx([(0.2 + 0.5) / (0.2 - 1.0)])


def test_normalize_and_lambda_by_hand() -> None:
    base = torch.tensor([1.0, 1.0])
    models = [torch.tensor([3.0, 0.0]), torch.tensor([2.0, 3.0])]  # δ = (2, −1), (1, 2)
    weights = [{"weight": 0.5}, {"weight": 1.5}]
    ties = OPERATORS["ties"]
    # signs: Σ = (2.5, 2.5) → +; entry 0 both agree: (1 + 1.5)/2; entry 1 only model 2: 3/1.5
    assert apply(ties, make_inputs(ties, models, base, weights)).tolist() == pytest.approx([2.25, 3.0])
    off = make_inputs(ties, models, base, weights, {"normalize": False, "lambda": 2.0})
    assert apply(ties, off).tolist() == pytest.approx([1 + 2 * 2.5, 1 + 2 * 3.0])
    ta = OPERATORS["task_arithmetic"]
    assert apply(ta, make_inputs(ta, models, base, weights, {"lambda": 0.5})).tolist() == pytest.approx(
        [1 + 0.5 * 2.5, 1 + 0.5 * 2.5]
    )


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_without_outliers_keeps_the_top_entries(name: str) -> None:
    op = OPERATORS[name]
    for shape, gamma in [((64,), 0.01), ((16, 16), 0.0)]:
        base, (model,) = random_case(shape, 1, seed=4)
        out = apply(op, make_inputs(op, [model], base, [{"weight": 1.0, "density": 0.25, "gamma": gamma}]))
        delta = f64(model) - f64(base)
        kept = f64(out) - f64(base)
        assert np.count_nonzero(np.abs(kept) > 1e-6) == int(0.25 * delta.size)  # mergekit keeps none
        np.testing.assert_allclose(kept, np.where(keep_top(delta, delta.size // 4), delta, 0.0), atol=1e-6)


def one_model_kept_mask(name: str, shape: tuple[int, ...], model_values: dict, seed: int):
    op = OPERATORS[name]
    base, (model,) = random_case(shape, 1, seed=seed)
    values = {"weight": 1.0, **model_values}
    out = apply(op, make_inputs(op, [model], base, [values], {"rescale": False}, seed=seed, name=NAME))
    delta, kept = f64(model) - f64(base), f64(out) - f64(base)
    np.testing.assert_allclose(kept[kept != 0], delta[kept != 0], rtol=1e-5)  # kept entries are unchanged
    return delta, kept != 0


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_drop_rate_is_bernoulli(name: str) -> None:
    for seed, density in [(0, 0.2), (1, 0.7)]:
        _, keep = one_model_kept_mask(name, (300, 100), {"density": density}, seed)
        n = keep.size
        assert abs(keep.sum() - density * n) < 5 * math.sqrt(n * density * (1 - density))


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_keep_rate_rises_with_row_rank(name: str) -> None:
    delta, keep = one_model_kept_mask(name, (3000, 10), {"density": 0.5, "epsilon": 0.4}, seed=5)
    ranks = np.argsort(np.argsort(np.abs(delta), axis=1, kind="stable"), axis=1, kind="stable")
    for rank, p in [(0, 0.1), (9, 0.9), (5, 0.1 + 0.8 * 5 / 9)]:
        rate = keep[ranks == rank].mean()
        assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / 3000), (rank, rate, p)
