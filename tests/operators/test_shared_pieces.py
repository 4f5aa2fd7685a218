"""The shared pieces of the methods (selection, draws, rescale, consensus, sums) and the torch kernels the
methods not yet written once still use, against plain numpy and the distributions they promise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gift_merge.dtypes import FLOAT32
from gift_merge.engine.backend import NUMPY
from gift_merge.engine.selection import kth_largest_and_count
from gift_merge.operators import draws, generator_for
from gift_merge.operators.base import Operands, Output
from gift_merge.operators.breadcrumbs import outlier_cut
from gift_merge.operators.consensus import consensus_sum
from gift_merge.operators.della import keep_mask
from gift_merge.operators.reductions import blocked_total, flat_dot, flat_norm
from gift_merge.operators.rescale import masked_l1_factor
from gift_merge.operators.selection import top_k
from gift_merge.operators.slerp import slerp_coefficients

from .operator_testing import ArraySource


def reference_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """The k first entries of the order (value descending, index ascending)."""
    flat = scores.reshape(-1)
    keep = np.zeros(flat.size, dtype=bool)
    keep[np.argsort(-flat, kind="stable")[: max(k, 0)]] = True
    return keep.reshape(scores.shape)


@pytest.mark.parametrize("shape", [(1,), (7,), (5, 13), (40, 40)])
@pytest.mark.parametrize("seed", [0, 1])
def test_top_k_matches_a_stable_sort(shape: tuple[int, ...], seed: int) -> None:
    scores = np.random.default_rng(seed).standard_normal(shape).astype(np.float32).reshape(-1)
    n = scores.size
    for k in sorted({0, 1, n // 3, n - 1, n, n + 5}):
        assert np.array_equal(top_k(NUMPY, scores, k), reference_topk(scores, k)), k


def test_top_k_breaks_ties_by_index_and_nests() -> None:
    scores = np.array([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0, 2.0], dtype=np.float32)
    assert top_k(NUMPY, scores, 3).tolist() == [False, True, True, True, False, False, False, False]
    assert top_k(NUMPY, scores, 4).tolist() == [False, True, True, True, True, False, False, False]
    assert top_k(NUMPY, np.zeros(10, dtype=np.float32), 4).tolist() == [True] * 4 + [False] * 6
    for a in range(9):
        assert bool((top_k(NUMPY, scores, a) <= top_k(NUMPY, scores, a + 1)).all())


def _outliers(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Breadcrumbs' keep mask of ``delta`` (over a zero base)."""
    operands = Operands(
        [ArraySource(delta)], ArraySource(np.zeros_like(delta)), delta.shape, NUMPY, Output(NUMPY, delta.size, FLOAT32)
    )
    cut = outlier_cut(operands, operands.sources[0], {"density": density, "gamma": gamma}, False)
    assert cut is not None
    return cut.keep


def test_breadcrumbs_drops_outliers_then_keeps_the_next() -> None:
    delta = (np.arange(1.0, 11.0) * np.array([1.0, -1.0] * 5)).astype(np.float32)  # |δ| = 1..10
    assert np.flatnonzero(_outliers(delta, density=0.3, gamma=0.2)).tolist() == [5, 6, 7]  # drop 10, 9
    # n_top + target > N: fewer outliers are dropped so that ⌊ρN⌋ entries stay
    assert np.flatnonzero(_outliers(delta, 0.9, 0.2)).tolist() == list(range(9))


def test_breadcrumbs_without_outliers_is_magnitude_top_k() -> None:
    rng = np.random.default_rng(3)
    matrix, vector = rng.standard_normal((64, 64)).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    # mergekit zeroes both: γ = 0 on a matrix, and the default γ = 0.01 on a 64-element vector
    assert np.array_equal(_outliers(matrix, 0.3, 0.0), top_k(NUMPY, np.abs(matrix).reshape(-1), int(0.3 * 4096)))
    assert np.array_equal(_outliers(vector, 0.5, 0.01), top_k(NUMPY, np.abs(vector), 32))


def test_bernoulli_keeps_density_in_distribution() -> None:
    n = 100_000
    for density in (0.1, 0.5, 0.9):
        kept = int(draws.bernoulli(generator_for(7, f"d{density}"), n, density).sum())
        assert abs(kept - density * n) < 5 * math.sqrt(n * density * (1 - density))
    u = draws.uniform(generator_for(8, "u"), n)
    assert np.array_equal(draws.bernoulli(generator_for(8, "u"), n, 0.3), u < np.float32(0.3))  # the same test


def test_draws_need_a_generator() -> None:
    with pytest.raises(ValueError, match="generator"):
        draws.bernoulli(None, 3, 0.5)


def _della_keep(magnitude: np.ndarray, density: float, epsilon: float, seed: int = 0) -> np.ndarray:
    """della.keep_mask of a (rows, width) |δ| on the numpy backend, as a bool array of its shape."""
    flat = magnitude.reshape(-1)
    operands = Operands(
        [ArraySource(flat)], ArraySource(np.zeros_like(flat)), magnitude.shape, NUMPY,
        Output(NUMPY, flat.size, FLOAT32), generator=generator_for(seed, "d"),
    )  # fmt: skip
    return keep_mask(operands, flat, density, epsilon).reshape(magnitude.shape)


def test_della_keeps_u_below_the_rank_probability() -> None:
    rng = np.random.default_rng(0)
    magnitude = np.abs(rng.standard_normal((6, 11)) * np.arange(1.0, 7.0)[:, None]).astype(np.float32)
    magnitude[2, :4] = 0.5  # ties rank by index
    u = draws.uniform(generator_for(0, "d"), magnitude.size).reshape(magnitude.shape)
    ranks = np.argsort(np.argsort(magnitude, axis=1, kind="stable"), axis=1, kind="stable")
    p = np.float32(0.3) + (ranks.astype(np.float32) / 10) * np.float32(0.4)
    assert np.array_equal(_della_keep(magnitude, density=0.5, epsilon=0.2), u < p)
    column = np.abs(rng.standard_normal((4, 1))).astype(np.float32)
    u = draws.uniform(generator_for(0, "d"), 4).reshape(4, 1)
    assert np.array_equal(_della_keep(column, 0.4, 0.1), u < np.float32(0.4))  # 1-element rows: p = ρ


def test_della_keep_rate_follows_the_rank() -> None:
    magnitude = np.abs(np.random.default_rng(1).standard_normal((4000, 8))).astype(np.float32)
    keep = _della_keep(magnitude, density=0.5, epsilon=0.3)
    rows = np.arange(4000)
    n, sd = 4000, math.sqrt(4000 * 0.25)
    assert abs(keep[rows, magnitude.argmax(axis=1)].sum() - 0.8 * n) < 5 * sd
    assert abs(keep[rows, magnitude.argmin(axis=1)].sum() - 0.2 * n) < 5 * sd


def test_l1_factor_matches_the_norm_and_skips_tiny_norms() -> None:
    magnitude = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    assert masked_l1_factor(NUMPY, magnitude.copy(), np.array([1, 0, 0, 1], dtype=bool)) == pytest.approx(2.0)
    tiny = np.full(4, 1e-9, dtype=np.float32)
    assert masked_l1_factor(NUMPY, tiny, np.array([1, 0, 0, 0], dtype=bool)) is None


def test_consensus_ties_to_plus_and_ignores_zeros() -> None:
    a = np.array([1.0, -1.0, 0.0, 2.0], dtype=np.float32)
    b = np.array([-1.0, 0.5, 0.0, -3.0], dtype=np.float32)
    mixed, divisor = consensus_sum(NUMPY, [a * 0.5, b * 2.0], [0.5, 2.0])  # Σ = [-1.5, 0.5, 0, -5]: σ = -, +, +, -
    assert mixed.tolist() == [-2.0, 1.0, 0.0, -6.0]
    assert divisor.tolist() == [2.0, 2.0, 1.0, 2.0]  # nothing agrees at the zeros: 0 → 1


def test_slerp_falls_back_to_lerp_only_when_near_parallel() -> None:
    rng = np.random.default_rng(0)
    v0, noise = rng.standard_normal(50), rng.standard_normal(50)

    def coefficients(t: float, v1: np.ndarray) -> tuple[float, float]:
        return slerp_coefficients(t, float(v0 @ v0), float(v1 @ v1), float(v0 @ v1))

    assert coefficients(0.3, v0 + 0.01 * noise) == (0.7, 0.3)  # cos ≈ 0.99995 > 0.9995
    s0, s1 = coefficients(0.3, v0 + 0.2 * noise)  # cos ≈ 0.98: true slerp
    assert abs(s0 - 0.7) > 1e-4 and abs(s1 - 0.3) > 1e-4
    assert coefficients(0.0, v0 + 0.2 * noise) == (1.0, 0.0)


def test_reductions_stay_accurate_on_large_tensors() -> None:
    """Sequential float32 sums (torch.dot, linalg.vector_norm on the CPU) lose ~1e-4 here; ours must not."""
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(1 << 22) * 0.01 + 0.005).astype(np.float32)
    b = (rng.standard_normal(1 << 22) * 0.01 + 0.005).astype(np.float32)
    exact_norm = float(np.linalg.norm(a.astype(np.float64)))
    exact_dot = float(a.astype(np.float64) @ b.astype(np.float64))
    assert flat_norm(NUMPY, a) == pytest.approx(exact_norm, rel=1e-6)
    assert flat_dot(NUMPY, a, b) == pytest.approx(exact_dot, rel=1e-6)
    rows = a.reshape(4, -1)
    np.testing.assert_allclose(
        NUMPY.sqrt(NUMPY.row_sums(rows * rows))[:, 0], np.linalg.norm(rows.astype(np.float64), axis=1), rtol=1e-6
    )
    exact_l1 = float(np.abs(a.astype(np.float64)).sum())
    assert blocked_total(NUMPY, np.abs(a)) == pytest.approx(exact_l1, rel=1e-6)


def _selection_inputs(seed: int) -> dict[str, np.ndarray]:
    """Arrays large enough for the sampled selection, each shaped to push it down another branch."""
    rng = np.random.default_rng(seed)
    n = (1 << 20) + 12_345
    sparse = np.zeros(n, dtype=np.float32)
    sparse[rng.choice(n, 300, replace=False)] = rng.random(300, dtype=np.float32) + 1  # rarely sampled
    with_nan = rng.random(n, dtype=np.float32)
    with_nan[rng.choice(n, 5, replace=False)] = np.nan
    return {
        "continuous": rng.random(n, dtype=np.float32),  # the guess is almost never the answer
        "bf16 deltas": np.abs(rng.standard_normal(n).astype(np.float32) * 1e-3).round(5),  # many ties
        "two values": rng.choice(np.array([0.25, 0.5], dtype=np.float32), n),
        "sorted": np.sort(rng.random(n)).astype(np.float64),
        "sparse": sparse,
        "nan": with_nan,
    }


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", ["continuous", "bf16 deltas", "two values", "sorted", "sparse", "nan"])
def test_kth_largest_is_an_exact_selection(case: str, seed: int) -> None:
    values = _selection_inputs(seed)[case]
    n = values.size
    ordered = np.sort(values)  # NaNs last: numpy's order, which introselect follows too
    for k in (1, 2, 17, 300, 301, n // 10, n // 2, n // 2 + 1, n - 301, n - 1, n):
        expected = ordered[n - k]
        got = kth_largest_and_count(values, k)[0]
        assert got == expected or (np.isnan(got) and np.isnan(expected)), (case, k)
        copy = values.copy()
        in_place = kth_largest_and_count(copy, k, in_place=True)[0]
        assert in_place == expected or (np.isnan(in_place) and np.isnan(expected)), (case, k)
        value, above = kth_largest_and_count(values, k)
        assert above == np.count_nonzero(values > value), (case, k)


def test_uniforms_are_exact_float32_uniforms() -> None:
    u = draws.uniform(generator_for(3, "w"), 1_000_001).astype(np.float64)
    assert u.min() >= 0 and u.max() < 1
    assert np.all(u * 2**24 == np.floor(u * 2**24))  # multiples of 2^-24: exact in float32
    n = u.size
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    histogram = np.bincount((u * 16).astype(int), minlength=16)
    assert np.all(np.abs(histogram - n / 16) < 5 * math.sqrt(n / 16))
    assert np.array_equal(u, draws.uniform(generator_for(3, "w"), 1_000_001))
    assert not np.array_equal(u, draws.uniform(generator_for(3, "v"), 1_000_001))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_row_order_equals_torchs_stable_argsort(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rows = (torch.randn(37, 301, generator=g) * 1e-3).bfloat16().float().abs()  # bf16: many equal values
    rows[3, 10:20] = 0.0
    rows[5, ::7] = float("nan")
    rows[6] = 0.25  # a row of one value: ranks by index
    expected = torch.argsort(rows, dim=1, stable=True) + torch.arange(0, rows.numel(), rows.shape[1])[:, None]
    assert np.array_equal(NUMPY.row_order(rows.numpy()), expected.numpy())  # flat positions, each row stably sorted
    assert np.array_equal(NUMPY.row_order(rows.double().numpy()), expected.numpy())  # the float64 path


@pytest.mark.parametrize("count", [0, 1, 6, 7])
def test_skip_draws_advances_exactly_as_drawing(count: int) -> None:
    drawn, skipped = generator_for(5, "s"), generator_for(5, "s")
    draws.uniform(drawn, count)
    draws.skip_draws(skipped, count)
    assert np.array_equal(draws.uniform(drawn, 9), draws.uniform(skipped, 9))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_backends_bitwise_where_is_np_where(dtype: type) -> None:
    """The backend selects on the bits; every value, dtype and signed zero must be np.where's."""
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(1, 3000))
        a, b = (rng.standard_normal(n).astype(dtype) for _ in range(2))
        for array in (a, b):
            at = rng.integers(0, n, size=4)
            array[at[:2]], array[at[2]], array[at[3]] = np.nan, -0.0, -np.inf
        mask = rng.random(n) < 0.5
        for other in (b, 0.0, -0.0, 1.0, -1.5, 0.1, 3, 1e300):
            with np.errstate(over="ignore"):
                expected, got = np.where(mask, a, other), NUMPY.where(mask, a, other)
            assert got.dtype == expected.dtype and np.array_equal(got.view(np.uint8), expected.view(np.uint8))
