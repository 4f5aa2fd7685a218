"""TSV, Iso-C and Iso-CTS against float64 references written here from the papers' equations.

Task vectors are random and exactly low-rank in float32 (integer multiples of 1/16 times each other, over
a base of multiples of 1/32, so θ_i − θ_b has no rounding at all), or full-rank; matrices are tall, wide
and square, some with more tasks than rank or than rows. Tolerance: the float32 merge is within
``REL`` of the largest entry of the reference's merged task matrix, plus two float32 ulps of the output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import gift_merge.operators.subspaces as subspaces
from gift_merge.cli import main
from gift_merge.engine.backend import NUMPY, TorchBackend
from gift_merge.operators import OPERATORS
from gift_merge.operators.iso import subspace_sizes
from tests import reference as ref

from .operator_testing import apply, make_inputs

REL = 1e-5
EPS32 = float(np.finfo(np.float32).eps)

# ----------------------------------------------------------------------------------------------- references


def svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.linalg.svd(x, full_matrices=False)


def nonzero(s: np.ndarray, shape: tuple[int, ...]) -> int:
    """The reference's own zero test, in float64: a singular value below 1e-12 of the largest is zero."""
    return int(np.sum(s > 1e-12 * s[0])) if s.size and s[0] > 0 else 0


def polar(x: np.ndarray) -> np.ndarray:
    """U Vᵀ of x = U S Vᵀ, over x's nonzero singular values."""
    u, s, vh = svd(x)
    r = nonzero(s, x.shape)
    return u[:, :r] @ vh[:r]


def mean_path(base: np.ndarray, taus: list[np.ndarray], alpha: float) -> np.ndarray:
    return base + alpha * sum(taus) / len(taus)


def ref_tsv(base: np.ndarray, thetas: list[np.ndarray], weights: list[float], alpha: float) -> np.ndarray:
    """Gargiulo et al. (arXiv 2412.00081) §TSV-Merge: per task the top ⌊r/T⌋ singular triplets, then
    Procrustes-orthogonalised U and V: Δ = polar([U_1…U_T]) diag(σ) polar([V_1…V_T])ᵀ."""
    taus = [w * (theta - base) for theta, w in zip(thetas, weights, strict=True)]
    if base.ndim != 2 or min(base.shape) < len(taus):
        return mean_path(base, taus, alpha)
    k = min(base.shape) // len(taus)
    us, ss, vs = [], [], []
    for tau in taus:
        u, s, vh = svd(tau)
        j = min(k, nonzero(s, tau.shape))
        us.append(u[:, :j])
        ss.append(s[:j])
        vs.append(vh[:j].T)
    if not sum(len(s) for s in ss):
        return base.copy()
    u_all, s_all, v_all = np.concatenate(us, axis=1), np.concatenate(ss), np.concatenate(vs, axis=1)
    return base + alpha * polar(u_all) @ np.diag(s_all) @ polar(v_all).T


def ref_iso_c(base: np.ndarray, thetas: list[np.ndarray], alpha: float) -> np.ndarray:
    """Marczak et al. (arXiv 2502.04959) Iso-C: Σ τ_i = U S Vᵀ → σ̄ U Vᵀ, σ̄ the mean singular value."""
    taus = [theta - base for theta in thetas]
    if base.ndim != 2:
        return mean_path(base, taus, alpha)
    u, s, vh = svd(sum(taus))
    r = nonzero(s, base.shape)
    if r == 0:
        return base.copy()
    return base + alpha * s[:r].mean() * u[:, :r] @ vh[:r]


def ref_sizes(r: int, tasks: int, fraction: float) -> tuple[int, int]:
    """Iso-CTS' subspace sizes: k = ⌊f r⌋, d = round((r − k)/T) (T·d capped at T·⌊r/T⌋), k = r − T d."""
    k = math.floor(r * fraction)
    d = min(round((r - k) / tasks), r // tasks)
    return r - tasks * d, d


def ref_iso_cts(base: np.ndarray, thetas: list[np.ndarray], alpha: float, fraction: float) -> np.ndarray:
    """Iso-CTS: the top k triplets of Σ τ_i (common), each τ_i's top d outside them (task-specific),
    U and V orthogonalised, every singular value replaced by their mean."""
    taus = [theta - base for theta in thetas]
    if base.ndim != 2:
        return mean_path(base, taus, alpha)
    k, d = ref_sizes(min(base.shape), len(taus), fraction)
    u, s, vh = svd(sum(taus))
    k = min(k, nonzero(s, base.shape))
    us, ss, vs = [u[:, :k]], [s[:k]], [vh[:k].T]
    for tau in taus if d else []:
        rest = tau - u[:, :k] @ (u[:, :k].T @ tau)
        ur, sr, vhr = svd(rest)
        scale = np.linalg.norm(tau) / math.sqrt(min(base.shape))
        j = min(d, int(np.sum(sr > 1e-9 * scale)))
        us.append(ur[:, :j])
        ss.append(sr[:j])
        vs.append(vhr[:j].T)
    s_all = np.concatenate(ss)
    if not s_all.size:
        return base.copy()
    u_all, v_all = np.concatenate(us, axis=1), np.concatenate(vs, axis=1)
    return base + alpha * s_all.mean() * polar(u_all) @ polar(v_all).T


# ----------------------------------------------------------------------------------------------- cases


def exact_case(shape: tuple[int, ...], ranks: list[int], seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A base and one model per rank whose task matrix has exactly that rank in float32 (or is a random
    exactly representable tensor, for shapes that are not matrices)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-64, 65, shape) / 32
    thetas = []
    for rank in ranks:
        if len(shape) == 2:
            tau = (rng.integers(-8, 9, (shape[0], rank)) / 16) @ (rng.integers(-8, 9, (rank, shape[1])) / 16)
        else:
            tau = rng.integers(-16, 17, shape) / 64
        thetas.append(base + tau)
    return base, thetas


def merge(name: str, base: np.ndarray, thetas: list[np.ndarray], model_values=None, global_values=None, backend=NUMPY):
    op = OPERATORS[name]
    inputs = make_inputs(
        op,
        [torch.from_numpy(t.astype(np.float32)) for t in thetas],
        torch.from_numpy(base.astype(np.float32)),
        model_values,
        global_values,
        seed=None,
    )
    return apply(op, inputs, backend)


def assert_merge_close(out: torch.Tensor, expected: np.ndarray, base: np.ndarray, rel: float = REL) -> None:
    got = out.double().numpy()
    scale = max(float(np.abs(expected - base).max()), 1e-30)
    tol = rel * scale + 2 * EPS32 * np.abs(expected)
    bad = np.abs(got - expected) > tol
    assert not bad.any(), (
        f"{int(bad.sum())} entries off; max error {np.abs(got - expected).max() / scale:.2e} of max |Δ|"
    )


# (shape, ranks of the task matrices): tall, wide, square; rank below, at and above ⌊r/T⌋; more tasks
# than rank, than rows; full rank
CASES = [
    ((40, 24), [4, 4, 4]),
    ((24, 40), [12, 12, 12]),
    ((32, 32), [2, 2, 2, 2, 2]),
    ((30, 50), [30, 30, 30, 30]),
    ((12, 30), [1] * 8),
    ((6, 20), [3] * 8),
    ((48, 20), [1, 20]),
    ((16, 16), [16]),
]
SEEDS = [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("shape", "ranks"), CASES, ids=str)
def test_tsv_matches_reference(shape: tuple[int, int], ranks: list[int], seed: int) -> None:
    base, thetas = exact_case(shape, ranks, seed)
    weights = [float(w) for w in np.random.default_rng(seed).uniform(-0.5, 1.5, len(ranks))]
    out = merge("tsv", base, thetas, [{"weight": w} for w in weights], {"alpha": 1.3})
    assert_merge_close(out, ref_tsv(base, thetas, weights, 1.3), base)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("shape", "ranks"), CASES, ids=str)
def test_iso_c_matches_reference(shape: tuple[int, int], ranks: list[int], seed: int) -> None:
    base, thetas = exact_case(shape, ranks, seed)
    out = merge("iso_c", base, thetas, global_values={"alpha": 1.5})
    assert_merge_close(out, ref_iso_c(base, thetas, 1.5), base)


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.0, 1.0])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("shape", "ranks"), CASES, ids=str)
def test_iso_cts_matches_reference(shape: tuple[int, int], ranks: list[int], seed: int, fraction: float) -> None:
    base, thetas = exact_case(shape, ranks, seed)
    out = merge("iso_cts", base, thetas, global_values={"alpha": 0.9, "common_space_fraction": fraction})
    assert_merge_close(out, ref_iso_cts(base, thetas, 0.9, fraction), base)


def test_iso_cts_with_the_whole_rank_common_is_iso_c() -> None:
    base, thetas = exact_case((30, 50), [30, 30, 30], 4)
    cts = merge("iso_cts", base, thetas, global_values={"common_space_fraction": 1.0})
    assert_merge_close(cts, ref_iso_c(base, thetas, 1.0), base)
    assert torch.equal(cts, merge("iso_c", base, thetas))


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
@pytest.mark.parametrize("shape", [(7,), (64,), (3, 4, 5)], ids=str)
def test_tensors_that_are_not_matrices_take_the_mean_task_vector(name: str, shape: tuple[int, ...]) -> None:
    """θ_b + α·(1/T)·Σ w_i τ_i, as the papers' code merges biases and norms (w_i = 1 for Iso)."""
    base, thetas = exact_case(shape, [0, 0, 0], 5)
    weights = [0.7, 1.0, 1.6] if name == "tsv" else [1.0] * 3
    model_values = [{"weight": w} for w in weights] if name == "tsv" else None
    out = merge(name, base, thetas, model_values, {"alpha": 1.7})
    expected = base + 1.7 * sum(w * (t - base) for w, t in zip(weights, thetas, strict=True)) / 3
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-6, atol=1e-6)


def test_tsv_of_identical_tasks_is_one_tasks_truncation() -> None:
    """T copies of τ: the duplicated singular vectors collapse (the polar factor over the range), so TSV
    gives τ's own top ⌊r/T⌋ triplets once."""
    base, (theta,) = exact_case((36, 30), [30], 6)
    u, s, vh = svd(theta - base)
    out = merge("tsv", base, [theta] * 3)
    assert_merge_close(out, base + (u[:, :10] * s[:10]) @ vh[:10], base)


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_zero_task_vectors_give_the_base(name: str) -> None:
    base, _ = exact_case((20, 30), [1], 7)
    out = merge(name, base, [base, base])
    assert torch.equal(out, torch.from_numpy(base.astype(np.float32)))


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_a_nan_input_makes_the_matrix_nan(name: str) -> None:
    base, thetas = exact_case((20, 30), [3, 3], 8)
    thetas[1][4, 5] = np.nan
    assert torch.isnan(merge(name, base, thetas)).all()


def test_subspace_sizes_follow_the_authors_arithmetic() -> None:
    for rank in range(1, 200):
        for tasks in range(1, 21):
            common = int(rank * 0.8)
            specific = round((rank - common) / tasks) * tasks
            assert subspace_sizes(rank, tasks, 0.8) == (rank - specific, specific // tasks)
    assert subspace_sizes(768, 8, 0.8) == (616, 19)
    assert subspace_sizes(3, 2, 0.0) == (1, 1)  # the authors' rounding would ask for 4 of 3 directions
    assert subspace_sizes(10, 3, 1.0) == (10, 0)


# ----------------------------------------------------------------------------------------------- randomized SVD


def spectrum_matrix(rng: np.random.Generator, shape: tuple[int, int], kind: str) -> np.ndarray:
    m, n = shape
    r = min(shape)
    u = np.linalg.qr(rng.standard_normal((m, r)))[0]
    v = np.linalg.qr(rng.standard_normal((n, r)))[0]
    s = {
        "decay": np.exp(-np.arange(r) / 8),
        "slow": np.exp(-np.arange(r) / 40),
        "lowrank": (np.arange(r) < 30) * (1 + rng.random(r)),
    }[kind]
    return ((u * np.sort(s)[::-1]) @ v.T).astype(np.float32)


@pytest.mark.parametrize("kind", ["decay", "lowrank"])
@pytest.mark.parametrize("shape", [(600, 520), (520, 700)], ids=str)
def test_randomized_svd_matches_the_full_svd(shape: tuple[int, int], kind: str) -> None:
    x = spectrum_matrix(np.random.default_rng(3), shape, kind)
    k = 40
    factors = subspaces.randomized_svd(NUMPY, x, k, np.random.default_rng(0))
    assert factors is not None, "a fast-decaying spectrum converges"
    u, s, vh = subspaces.truncated_svd(NUMPY, x, k, np.random.default_rng(0))
    fu, fs, fvh = svd(x.astype(np.float64))
    j = len(s)
    assert j == (30 if kind == "lowrank" else k)  # float32 rounding noise beyond rank 30 is below the floor
    np.testing.assert_allclose(s, fs[:j], rtol=1e-5, atol=1e-6 * fs[0])
    want = (fu[:, :j] * fs[:j]) @ fvh[:j]
    np.testing.assert_allclose((u * s) @ vh, want, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(u @ vh, fu[:, :j] @ fvh[:j], atol=1e-4)


def test_randomized_svd_gives_way_to_the_full_one_on_a_flat_spectrum() -> None:
    x = np.random.default_rng(4).standard_normal((600, 520)).astype(np.float32)
    assert subspaces.randomized_svd(NUMPY, x, 40, np.random.default_rng(0)) is None
    u, s, vh = subspaces.truncated_svd(NUMPY, x, 40, np.random.default_rng(0))
    tu, ts, tvh = subspaces.top_triplets(NUMPY, x, 40)
    assert np.array_equal(s, ts) and np.array_equal(u, tu) and np.array_equal(vh, tvh)
    fu, fs, fvh = svd(x.astype(np.float64))
    np.testing.assert_allclose(s, fs[:40], rtol=1e-6)
    signs = np.sign(np.sum(u * fu[:, :40], axis=0))  # each singular vector up to its sign
    np.testing.assert_allclose(u * signs, fu[:, :40], atol=1e-5)
    np.testing.assert_allclose(vh * signs[:, None], fvh[:40], atol=1e-5)


@pytest.mark.parametrize("shape", [(700, 60), (60, 700), (64, 64)], ids=str)
@pytest.mark.parametrize("kind", ["decay", "lowrank"])
def test_small_side_decomposition_matches_lapack(shape: tuple[int, int], kind: str) -> None:
    """The triplets and the polar factor from the float64 Gram matrix of the small side agree with a
    float64 LAPACK SVD of the float32 matrix; beyond a low rank, float32 rounding noise stays below the floor."""
    x = spectrum_matrix(np.random.default_rng(8), shape, kind)
    fu, fs, fvh = svd(x.astype(np.float64))
    u, s, vh = subspaces.top_triplets(NUMPY, x, 50)
    j = len(s)
    assert j == min(50, 30 if kind == "lowrank" else min(shape))
    np.testing.assert_allclose(s, fs[:j], rtol=1e-6, atol=1e-6 * fs[0])
    np.testing.assert_allclose((u * s) @ vh, (fu[:, :j] * fs[:j]) @ fvh[:j], atol=1e-6 * fs[0])
    left, right = subspaces.polar_factors(NUMPY, x)
    rank = 30 if kind == "lowrank" else min(shape)
    np.testing.assert_allclose(left.astype(np.float64) @ right, fu[:, :rank] @ fvh[:rank], atol=1e-5)


def count_randomized(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record each randomized SVD's outcome (converged or not)."""
    calls: list[bool] = []
    original = subspaces.randomized_svd

    def counted(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(subspaces, "randomized_svd", counted)
    return calls


def test_tsv_with_randomized_svds_matches_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight tasks on 600 × 520 matrices: k = 65, so each task's SVD is randomized (and converges on
    these decaying spectra); the merge still meets the float64 reference."""
    rng = np.random.default_rng(5)
    base = np.zeros((600, 520))
    thetas = [spectrum_matrix(rng, (600, 520), "decay").astype(np.float64) for _ in range(8)]
    calls = count_randomized(monkeypatch)
    out = merge("tsv", base, thetas)
    assert calls == [True] * 8
    assert_merge_close(out, ref_tsv(base, thetas, [1.0] * 8, 1.0), base, rel=1e-4)


def test_iso_cts_with_randomized_svds_matches_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Iso-CTS's task-specific subspaces (d = 35 of r = 520 here) are randomized. The tasks sit on
    disjoint blocks of rows and columns with slowly decaying spectra, so the common subspace takes the top
    of each and each task's residual is its own decaying tail. (Tasks whose residuals overlap make the
    orthogonalisation ill-conditioned, in float32 as in the authors' code, whatever the SVD.)"""
    rng = np.random.default_rng(6)
    thetas = []
    for i, scale in enumerate((1.0, 0.9, 0.8)):
        tau = np.zeros((600, 520))
        tau[200 * i : 200 * (i + 1), 173 * i : 173 * (i + 1)] = scale * spectrum_matrix(rng, (200, 173), "slow")
        thetas.append(tau.astype(np.float32).astype(np.float64))
    base = np.zeros((600, 520))
    calls = count_randomized(monkeypatch)
    out = merge("iso_cts", base, thetas)
    assert calls == [True] * 3
    assert_merge_close(out, ref_iso_cts(base, thetas, 1.0, 0.8), base, rel=1e-4)


@pytest.mark.parametrize("name", ["tsv", "iso_cts"])
def test_randomized_path_writes_the_same_bytes_on_both_cpu_backends(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subspaces, "RANDOMIZED_FROM", 16)
    calls = count_randomized(monkeypatch)
    rng = np.random.default_rng(7)
    base = rng.integers(-64, 65, (120, 100)) / 32
    thetas = [base + spectrum_matrix(rng, (120, 100), "decay") for _ in range(8)]
    values = {"common_space_fraction": 0.3} if name == "iso_cts" else None
    on_numpy = merge(name, base, thetas, global_values=values)
    on_torch = merge(name, base, thetas, global_values=values, backend=TorchBackend("cpu"))
    assert calls and all(calls)
    assert torch.equal(on_numpy, on_torch)
    assert torch.equal(on_numpy, merge(name, base, thetas, global_values=values))  # and on every run


# ----------------------------------------------------------------------------------------------- registry


def test_parameters_and_defaults() -> None:
    expected = {
        "tsv": {"weight": 1.0, "alpha": 1.0},
        "iso_c": {"alpha": 1.0},
        "iso_cts": {"common_space_fraction": 0.8, "alpha": 1.0},
    }
    for name, params in expected.items():
        op = OPERATORS[name]
        assert {p.name: p.default for p in op.params} == params
        assert (op.base, op.min_models, op.max_models, op.random) == ("required", 1, None, False)
    assert [p.name for p in OPERATORS["tsv"].model_params] == ["weight"]
    fraction = OPERATORS["iso_cts"].params[0]
    assert fraction.check is not None
    assert fraction.check(1.5) and fraction.check(-0.1) and fraction.check(0.0) is None
    for name in expected:
        alpha = next(p for p in OPERATORS[name].params if p.name == "alpha")
        assert alpha.check is not None and alpha.check(math.nan)


# ----------------------------------------------------------------------------------------------- end to end

RECIPES = {
    "tsv": "merge_method: tsv\nbase_model: {base}\nmodels:\n  - model: {math}\n    parameters: {{weight: 0.8}}\n"
    "  - model: {code}\n  - model: {instruct}\nparameters: {{alpha: 1.2}}\n",
    "iso_c": "merge_method: iso_c\nbase_model: {base}\nmodels:\n  - model: {math}\n  - model: {code}\n"
    "  - model: {instruct}\nparameters: {{alpha: 1.5}}\n",
    "iso_cts": "merge_method: iso_cts\nbase_model: {base}\nmodels:\n  - model: {math}\n  - model: {code}\n"
    "  - model: {instruct}\nparameters: {{alpha: 1.3, common_space_fraction: 0.7}}\n",
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_cli_recipe_on_tiny_models_equals_the_reference(tmp_path: Path, llama: dict[str, Path], name: str) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPES[name].format(**llama))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(recipe), str(out), "-q"])
    assert result.exit_code == 0, result.output
    merged = ref.load_all(out)
    base = ref.load_all(llama["base"])
    models = [ref.load_all(llama[key]) for key in ("math", "code", "instruct")]
    assert set(merged) == set(base)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    for tensor, value in merged.items():
        b = ref.f64(base[tensor])
        thetas = [ref.f64(m[tensor]) for m in models]
        if name == "tsv":
            expected = ref_tsv(b, thetas, [0.8, 1.0, 1.0], 1.2)
        elif name == "iso_c":
            expected = ref_iso_c(b, thetas, 1.5)
        else:
            expected = ref_iso_cts(b, thetas, 1.3, 0.7)
        assert value.dtype == torch.float32 and tuple(value.shape) == b.shape, tensor
        assert_merge_close(value, expected, b, rel=1e-4)
