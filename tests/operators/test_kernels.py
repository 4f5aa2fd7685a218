"""The shared kernels, against plain numpy and against the distributions they promise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gift_merge.operators import generator_for
from gift_merge.operators.kernels import (
    breadcrumbs_mask,
    della_keep_probabilities,
    elect_signs,
    flat_dot,
    flat_norm,
    l1_rescale,
    magnitude_mask,
    random_drop_mask,
    row_norm,
    sign_masks,
    slerp_flat,
    topk_mask,
)


def reference_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """The k first entries of the order (value descending, index ascending)."""
    flat = scores.reshape(-1)
    keep = np.zeros(flat.size, dtype=bool)
    keep[np.argsort(-flat, kind="stable")[: max(k, 0)]] = True
    return keep.reshape(scores.shape)


@pytest.mark.parametrize("shape", [(1,), (7,), (5, 13), (40, 40)])
@pytest.mark.parametrize("seed", [0, 1])
def test_topk_mask_matches_a_stable_sort(shape: tuple[int, ...], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(shape, generator=g)
    n = scores.numel()
    for k in sorted({0, 1, n // 3, n - 1, n, n + 5}):
        assert np.array_equal(topk_mask(scores, k).numpy(), reference_topk(scores.numpy(), k)), k


def test_topk_mask_breaks_ties_by_index_and_nests() -> None:
    scores = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0, 2.0])
    assert topk_mask(scores, 3).tolist() == [False, True, True, True, False, False, False, False]
    assert topk_mask(scores, 4).tolist() == [False, True, True, True, True, False, False, False]
    everything_equal = torch.zeros(10)
    assert topk_mask(everything_equal, 4).tolist() == [True] * 4 + [False] * 6
    for a in range(9):
        assert bool((topk_mask(scores, a) <= topk_mask(scores, a + 1)).all())


def test_magnitude_mask_keeps_floor_density_n_and_zero_is_empty() -> None:
    delta = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.0, 4.0])
    assert magnitude_mask(delta, 0.5).tolist() == [False, True, False, True, False, False, True]
    assert not magnitude_mask(delta, 0.1).any()  # ⌊0.7⌋ = 0: nothing kept, no crash


def test_breadcrumbs_mask_drops_outliers_then_keeps_the_next() -> None:
    delta = torch.arange(1.0, 11.0) * torch.tensor([1.0, -1.0] * 5)  # |δ| = 1..10
    keep = breadcrumbs_mask(delta, density=0.3, gamma=0.2)  # drop 10, 9; keep 8, 7, 6
    assert torch.nonzero(keep).flatten().tolist() == [5, 6, 7]
    # n_top + target > N: fewer outliers are dropped so that ⌊ρN⌋ entries stay
    assert torch.nonzero(breadcrumbs_mask(delta, 0.9, 0.2)).flatten().tolist() == list(range(9))


def test_breadcrumbs_mask_without_outliers_is_magnitude_top_k() -> None:
    g = torch.Generator().manual_seed(3)
    matrix, vector = torch.randn(64, 64, generator=g), torch.randn(64, generator=g)
    # mergekit zeroes both: γ = 0 on a matrix, and the default γ = 0.01 on a 64-element vector
    assert torch.equal(breadcrumbs_mask(matrix, 0.3, 0.0), magnitude_mask(matrix, 0.3))
    assert torch.equal(breadcrumbs_mask(vector, 0.5, 0.01), magnitude_mask(vector, 0.5))
    assert int(breadcrumbs_mask(vector, 0.5, 0.01).sum()) == 32


def test_random_drop_keeps_density_in_distribution() -> None:
    delta = torch.ones(200, 500)
    for density in (0.1, 0.5, 0.9):
        kept = int(random_drop_mask(delta, density, generator_for(7, f"d{density}")).sum())
        n = delta.numel()
        assert abs(kept - density * n) < 5 * math.sqrt(n * density * (1 - density))


def test_random_drop_needs_a_generator() -> None:
    with pytest.raises(ValueError, match="generator"):
        random_drop_mask(torch.ones(3), 0.5, None)


def test_della_probabilities_are_ranked_per_row() -> None:
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 11, generator=g) * torch.arange(1.0, 7.0)[:, None]  # rows on different scales
    probs = della_keep_probabilities(delta, density=0.5, epsilon=0.2).double().numpy()
    for row, p in zip(delta.numpy(), probs, strict=True):
        ranks = np.argsort(np.argsort(np.abs(row), kind="stable"), kind="stable")
        np.testing.assert_allclose(p, 0.3 + 0.4 * ranks / 10, rtol=1e-6)
    vector = della_keep_probabilities(torch.tensor([3.0, -1.0, 2.0]), 0.5, 0.2)
    np.testing.assert_allclose(vector.numpy(), [0.7, 0.3, 0.5], rtol=1e-6)
    column = della_keep_probabilities(torch.randn(4, 1, generator=g), 0.4, 0.1)
    np.testing.assert_allclose(column.numpy(), np.full((4, 1), 0.4), rtol=1e-6)  # 1-element rows: p = ρ


def test_della_keep_rate_follows_the_rank() -> None:
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(4000, 8, generator=g)
    probs = della_keep_probabilities(delta, density=0.5, epsilon=0.3)
    keep = (torch.rand(delta.shape, generator=torch.Generator().manual_seed(0)) < probs).double()
    largest = delta.abs().argmax(dim=1, keepdim=True)
    smallest = delta.abs().argmin(dim=1, keepdim=True)
    n, sd = 4000, math.sqrt(4000 * 0.25)
    assert abs(keep.gather(1, largest).sum().item() - 0.8 * n) < 5 * sd
    assert abs(keep.gather(1, smallest).sum().item() - 0.2 * n) < 5 * sd


def test_l1_rescale_matches_the_norm_and_skips_tiny_norms() -> None:
    delta = torch.tensor([1.0, -2.0, 3.0, -4.0])
    kept = delta * torch.tensor([1.0, 0.0, 0.0, 1.0])
    out = l1_rescale(delta, kept)
    assert out.abs().sum().item() == pytest.approx(10.0)
    assert out.tolist() == pytest.approx([2.0, 0.0, 0.0, -8.0])
    tiny = torch.full((4,), 1e-9)
    assert torch.equal(l1_rescale(tiny, tiny * torch.tensor([1.0, 0, 0, 0])), tiny * torch.tensor([1.0, 0, 0, 0]))


def test_sign_election_ties_to_plus_and_ignores_zeros() -> None:
    a = torch.tensor([1.0, -1.0, 0.0, 2.0])
    b = torch.tensor([-1.0, 0.5, 0.0, -3.0])
    sigma = elect_signs([a, b])
    assert sigma.tolist() == [1.0, -1.0, 1.0, -1.0]
    ma, mb = sign_masks([a, b], sigma)
    assert ma.tolist() == [True, True, False, False]
    assert mb.tolist() == [False, False, False, True]


def test_slerp_flat_falls_back_to_lerp_only_when_near_parallel() -> None:
    g = torch.Generator().manual_seed(0)
    v0 = torch.randn(50, generator=g)
    noise = torch.randn(50, generator=g)
    near = v0 + 0.01 * noise  # cos ≈ 0.99995 > 0.9995
    assert torch.allclose(slerp_flat(0.3, v0, near), 0.7 * v0 + 0.3 * near)
    far = v0 + 0.2 * noise  # cos ≈ 0.98: true slerp, measurably different from lerp
    assert not torch.allclose(slerp_flat(0.3, v0, far), 0.7 * v0 + 0.3 * far, rtol=0, atol=1e-4)
    assert torch.equal(slerp_flat(0.0, v0, far), v0)


def test_reductions_stay_accurate_on_large_tensors() -> None:
    """torch.dot / linalg.vector_norm lose ~1e-4 here on the CPU; the kernels must not."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1 << 22, generator=g) * 0.01 + 0.005
    b = torch.randn(1 << 22, generator=g) * 0.01 + 0.005
    exact_norm = float(np.linalg.norm(a.double().numpy()))
    exact_dot = float(a.double().numpy() @ b.double().numpy())
    assert flat_norm(a) == pytest.approx(exact_norm, rel=1e-6)
    assert flat_dot(a, b) == pytest.approx(exact_dot, rel=1e-6)
    rows = a.reshape(4, -1)
    np.testing.assert_allclose(
        row_norm(rows).double().numpy()[:, 0], np.linalg.norm(rows.double().numpy(), axis=1), rtol=1e-6
    )
    kept = a * (b > 0.005)
    ratio = float(a.double().abs().sum() / kept.double().abs().sum())
    assert float(l1_rescale(a, kept).double().abs().sum() / kept.double().abs().sum()) == pytest.approx(ratio, rel=1e-6)


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
def test_kth_largest_array_is_an_exact_selection(case: str, seed: int) -> None:
    from gift_merge.operators.kernels import kth_largest_and_count, kth_largest_array

    values = _selection_inputs(seed)[case]
    n = values.size
    ordered = np.sort(values)  # NaNs last: numpy's order, which introselect follows too
    for k in (1, 2, 17, 300, 301, n // 10, n // 2, n // 2 + 1, n - 301, n - 1, n):
        expected = ordered[n - k]
        got = kth_largest_array(values, k)
        assert got == expected or (np.isnan(got) and np.isnan(expected)), (case, k)
        copy = values.copy()
        in_place = kth_largest_array(copy, k, in_place=True)
        assert in_place == expected or (np.isnan(in_place) and np.isnan(expected)), (case, k)
        value, above = kth_largest_and_count(values, k)
        assert above == np.count_nonzero(values > value), (case, k)


def test_uniform_floats_are_exact_float32_uniforms() -> None:
    from gift_merge.operators.kernels import uniform_floats

    u = uniform_floats(generator_for(3, "w"), 1_000_001).double().numpy()
    assert u.min() >= 0 and u.max() < 1
    assert np.all(u * 2**24 == np.floor(u * 2**24))  # multiples of 2^-24: exact in float32
    n = u.size
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    histogram = np.bincount((u * 16).astype(int), minlength=16)
    assert np.all(np.abs(histogram - n / 16) < 5 * math.sqrt(n / 16))
    again = uniform_floats(generator_for(3, "w"), 1_000_001).double().numpy()
    assert np.array_equal(u, again)
    assert not np.array_equal(u, uniform_floats(generator_for(3, "v"), 1_000_001).double().numpy())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_della_row_ranks_equal_torchs_stable_argsort(seed: int) -> None:
    from gift_merge.operators.kernels import _stable_row_ranks

    g = torch.Generator().manual_seed(seed)
    rows = (torch.randn(37, 301, generator=g) * 1e-3).bfloat16().float().abs()  # bf16: many equal values
    rows[3, 10:20] = 0.0
    rows[5, ::7] = float("nan")
    rows[6] = 0.25  # a row of one value: ranks by index
    order = torch.argsort(rows, dim=1, stable=True)
    expected = torch.empty_like(order).scatter_(1, order, torch.arange(rows.shape[1]).expand_as(order))
    assert torch.equal(_stable_row_ranks(rows.numpy()), expected)


@pytest.mark.parametrize("count", [0, 1, 6, 7])
def test_skip_draws_advances_exactly_as_drawing(count: int) -> None:
    from gift_merge.operators.kernels import skip_draws, uniform_floats

    drawn, skipped = generator_for(5, "s"), generator_for(5, "s")
    uniform_floats(drawn, count)
    skip_draws(skipped, count)
    assert torch.equal(uniform_floats(drawn, 9), uniform_floats(skipped, 9))
