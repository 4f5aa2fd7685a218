"""arcee_fusion, ram and ramplus_tl against the float64 references of ``tests/reference.py``, through the
operators on fresh random inputs, by hand, and as recipes through the command line on tiny models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import gift_merge.engine.blocks as blocks
import gift_merge.engine.selection as selection
import gift_merge.operators.base as operator_base
from gift_merge.cli import main
from gift_merge.engine.backend import NUMPY
from gift_merge.operators import OPERATORS
from gift_merge.operators.arcee_fusion import row_kl
from gift_merge.operators.ram import unique_scale
from tests import reference as ref

from .operator_testing import SEEDS, SHAPES, apply, assert_matches, f64, make_inputs, random_case

FUSION_SHAPES = [*SHAPES, (3, 4, 10), (130, 64)]


def fusion_case(shape: tuple[int, ...], seed: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A base of LLM-sized weights (σ 0.02) and a fine-tune of it, the change ``scale``·N(0, 1)."""
    g = torch.Generator().manual_seed(2000 + seed)
    base = 0.02 * torch.randn(shape, generator=g)
    return base, base + scale * torch.randn(shape, generator=g)


def assert_fusion(base: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The operator's output is the reference's, entry for entry (up to the entries the reference marks as
    within float32 rounding of the threshold, which must be rare); returns the kept mask."""
    op = OPERATORS["arcee_fusion"]
    out = apply(op, make_inputs(op, [theta], base))
    expected, ambiguous = ref.arcee_fusion(f64(theta), f64(base))
    assert int(ambiguous.sum()) <= 1
    sure = ~torch.from_numpy(ambiguous)
    assert_matches(torch.where(sure, out, base), np.where(ambiguous, f64(base), expected))
    return torch.from_numpy(np.asarray(expected != f64(base)))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", FUSION_SHAPES)
@pytest.mark.parametrize("scale", [1e-3, 0.3])
def test_arcee_fusion(shape: tuple[int, ...], seed: int, scale: float) -> None:
    """Fine-tune-sized changes (1e-3 on weights of 0.02, where a float32 KL is mostly rounding error) and
    large ones; matrices, a vector and a 3-D tensor (rows along the last dimension)."""
    base, theta = fusion_case(shape, seed, scale)
    assert_fusion(base, theta)


def test_arcee_fusion_keeps_a_selective_mask() -> None:
    """The fence keeps the outliers only: on a 130×64 tensor a small share of the entries, but some."""
    base, theta = fusion_case((130, 64), 0, 1e-3)
    kept = assert_fusion(base, theta)
    assert 0.01 < float(kept.float().mean()) < 0.2


def test_arcee_fusion_random_case_inputs() -> None:
    """The shared random inputs of the operator tests (large, correlated changes)."""
    for shape in SHAPES:
        for seed in SEEDS:
            base, (theta,) = random_case(shape, 1, seed)
            assert_fusion(base, theta)


def test_arcee_fusion_keeps_everything_at_a_zero_fence() -> None:
    """The mask is s ≥ τ: when most entries are unchanged τ = 0 and every entry is kept (mergekit's rule)."""
    base = torch.zeros(16)
    theta = base.clone()
    theta[3], theta[9] = 0.5, -0.25
    out = apply(OPERATORS["arcee_fusion"], make_inputs(OPERATORS["arcee_fusion"], [theta], base))
    assert torch.equal(out, theta)


def test_arcee_fusion_keeps_changes_at_the_fence() -> None:
    """The mask is s ≥ τ. A row shifted by a constant has the base's softmax, so KL = 0 and s = 0 however large
    its change; with most importances 0, τ = 0 and those rows are kept (mergekit computes the same zeros)."""
    base = torch.zeros(4, 4)
    theta = torch.stack([torch.full((4,), 0.5), torch.full((4,), -0.25), torch.zeros(4), torch.tensor([1.0, 0, 0, 0])])
    out = apply(OPERATORS["arcee_fusion"], make_inputs(OPERATORS["arcee_fusion"], [theta], base))
    assert torch.equal(out, theta)


@pytest.mark.parametrize("seed", SEEDS)
def test_arcee_fusion_wide_logits(seed: int) -> None:
    """Rows of spread-out values, whose softmax has entries far below the 1e-8 added to it."""
    g = torch.Generator().manual_seed(4000 + seed)
    for shape in [(24, 40), (300,)]:
        base = 12 * torch.randn(shape, generator=g)
        theta = base + torch.randn(shape, generator=g)
        assert_fusion(base, theta)


def test_arcee_fusion_kl_adds_the_epsilon_before_the_ratio() -> None:
    """Far-apart logits put softmax entries below 1e-8, where the ε added to p and q sets the KL (by 3.6×
    here: the tail's log-ratio is log((4.5e-5 + ε)/(4e-18 + ε)) ≈ 8.4 with ε, 30 without)."""
    base = np.array([[0.0] + [-40.0] * 7, [0.0, 0.1, -0.2, 0.3, 0.0, 0.1, 0.0, -0.1]])
    theta = np.array([[0.0] + [-10.0] * 7, [0.1, 0.0, -0.1, 0.3, 0.1, 0.0, 0.0, -0.1]])
    expected = []
    for t_row, b_row in zip(theta, base, strict=True):
        p = np.exp(t_row) / np.exp(t_row).sum() + 1e-8
        q = np.exp(b_row) / np.exp(b_row).sum() + 1e-8
        expected.append(sum(pj * math.log(pj / qj) for pj, qj in zip(p, q, strict=True)))
    got = row_kl(NUMPY, theta.astype(np.float32), base.astype(np.float32))
    assert got.shape == (2, 1) and got.dtype == np.float64
    np.testing.assert_allclose(got[:, 0], expected, rtol=1e-6)


def test_arcee_fusion_quantiles_are_lower_order_statistics() -> None:
    """N = 6 importances: Q_¼, Q_½, Q_¾ are the sorted entries at ⌊f·5⌋ = 1, 2, 3, not interpolations.

    A vector is one row, so KL is one number k and s = k·|δ|. Sorted |δ| = 2, 2.9, 3, 4, 5, 5.6 gives
    τ/k = 3 + 1.5·(4 − 2.9) = 4.65: 5 and 5.6 are kept. Interpolated quantiles (2.925, 3.5, 4.75) would
    give τ/k = 6.24 and keep nothing."""
    base = torch.zeros(6)
    theta = torch.tensor([2.9, 2.0, 3.0, 4.0, 5.0, 5.6])
    out = apply(OPERATORS["arcee_fusion"], make_inputs(OPERATORS["arcee_fusion"], [theta], base))
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0, 5.0, 5.6])
    expected, _ = ref.arcee_fusion(f64(theta), f64(base))
    assert_matches(out, expected)


def test_arcee_fusion_streams_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny slices (blocks of whole rows) and the sampled selection give the whole-tensor bytes."""
    op = OPERATORS["arcee_fusion"]
    cases = [fusion_case(shape, 1, 1e-3) for shape in [(130, 64), (3000,), (40, 7, 9)]]
    whole = [apply(op, make_inputs(op, [theta], base)) for base, theta in cases]
    monkeypatch.setattr(operator_base, "CHUNK", 100)
    monkeypatch.setattr(selection, "_GUESS_FROM", 64)
    monkeypatch.setattr(selection, "_SAMPLE", 32)
    for (base, theta), expected in zip(cases, whole, strict=True):
        assert torch.equal(apply(op, make_inputs(op, [theta], base)), expected)


def ram_case(shape: tuple[int, ...], n: int, seed: int, epsilon: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and n models whose changes are 0 or ε·10^u, |u| ∈ [0.05, 2]: never within 10 % of ε, so no
    entry's activity depends on rounding. Models change different shares of the entries (90 %, 50 %, 20 %,
    …), so the per-model ratios of shared to unique changes differ."""
    rng = np.random.default_rng(3000 + seed)
    base = rng.standard_normal(shape).astype(np.float32) * 0.02
    models = []
    for i in range(n):
        exponent = rng.uniform(0.05, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
        delta = epsilon * 10.0**exponent * rng.choice([-1.0, 1.0], shape)
        changed = rng.random(shape) < [0.9, 0.5, 0.2, 0.35][i % 4]
        models.append(torch.from_numpy((base + np.where(changed, delta, 0.0)).astype(np.float32)))
    return torch.from_numpy(base), models


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ram(n: int, shape: tuple[int, ...], seed: int) -> None:
    op = OPERATORS["ram"]
    for epsilon in (1e-5, 0.01):
        base, models = ram_case(shape, n, seed, epsilon)
        out = apply(op, make_inputs(op, models, base, global_values={"epsilon": epsilon}))
        assert_matches(out, ref.ram([f64(m) for m in models], f64(base), epsilon))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ramplus_tl(n: int, shape: tuple[int, ...], seed: int) -> None:
    op = OPERATORS["ramplus_tl"]
    for epsilon, r, alpha in [(1e-5, 0.1, 0.2), (0.01, 0.5, 5.0), (0.01, 2.0, 0.7)]:
        base, models = ram_case(shape, n, seed, epsilon)
        values = {"epsilon": epsilon, "r": r, "alpha": alpha}
        out = apply(op, make_inputs(op, models, base, global_values=values))
        assert_matches(out, ref.ram([f64(m) for m in models], f64(base), epsilon, r, alpha))


def test_ram_by_hand() -> None:
    """Four entries, two models (ε = 0.1): unique to model 0, unique to model 1, shared, below ε in both."""
    base = torch.zeros(4)
    models = [torch.tensor([1.0, 0.05, 0.4, 0.1]), torch.tensor([0.0, -2.0, 0.8, -0.05])]
    ram = OPERATORS["ram"]
    out = apply(ram, make_inputs(ram, models, base, global_values={"epsilon": 0.1}))
    assert out.tolist() == pytest.approx([1.0, -2.0, 0.6, 0.0])
    # RAM+: each model has one shared and one unique change, ρ = 1, λ = 1 + r·min(1, α)
    plus = OPERATORS["ramplus_tl"]
    values = {"epsilon": 0.1, "r": 0.5, "alpha": 0.4}
    out = apply(plus, make_inputs(plus, models, base, global_values=values))
    assert out.tolist() == pytest.approx([1.2, -2.4, 0.6, 0.0])


def test_ramplus_tl_ratio_is_tensor_local_and_per_model() -> None:
    """Model 0 changes 3 entries alone and shares 1 (ρ = 1/3); model 1 shares 1 and changes 1 alone (ρ = 1)."""
    base = torch.zeros(6)
    models = [torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.0])]
    plus = OPERATORS["ramplus_tl"]
    out = apply(plus, make_inputs(plus, models, base, global_values={"epsilon": 1e-5, "r": 1.0, "alpha": 10.0}))
    assert out.tolist() == pytest.approx([4 / 3, 4 / 3, 4 / 3, 1.0, 2.0, 0.0])


def test_unique_scale_is_mergekits_float32_rule() -> None:
    assert unique_scale(3, 1, 1.0, 10.0, 1e-5) == 4.0
    assert unique_scale(3, 1, 1.0, 10.0, 2.0) == 2.5  # ε also floors U (mergekit's clamp(min=epsilon))
    assert unique_scale(5, 0, 0.1, 0.2, 0.0) == 1.0  # no unique change: λ multiplies nothing (mergekit: NaN)
    third = np.float32(1) / np.float32(3)
    assert unique_scale(1, 3, 0.1, 1.0, 1e-5) == float(np.float32(1) + np.float32(0.1) * third)
    assert unique_scale(100, 3, 0.1, 0.2, 1e-5) == float(np.float32(1) + np.float32(0.1) * np.float32(0.2))


def test_ram_streams_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    cases = [ram_case(shape, 3, 2, 1e-5) for shape in [(130, 64), (3000,)]]
    ops = [OPERATORS["ram"], OPERATORS["ramplus_tl"]]
    whole = [apply(op, make_inputs(op, models, base)) for op in ops for base, models in cases]
    monkeypatch.setattr(operator_base, "CHUNK", 100)
    monkeypatch.setattr(blocks, "CHUNK_FROM", 1)
    monkeypatch.setattr(blocks, "ELEMENTWISE_CHUNK", 99)
    again = [apply(op, make_inputs(op, models, base)) for op in ops for base, models in cases]
    assert all(torch.equal(a, b) for a, b in zip(whole, again, strict=True))


# ------------------------------------------------------------------------------------------- recipes


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from gift_merge.toy.tiny_models import build_family

    return build_family(tmp_path_factory.mktemp("fusion-ram"), "llama", seed=5, num_layers=2, hidden=32)


def run(tmp_path: Path, family: dict[str, Path], text: str, name: str = "recipe.yml") -> tuple[int, str, Path]:
    for key, path in family.items():
        text = text.replace("{" + key + "}", str(path))
    recipe = tmp_path / name
    recipe.write_text(text)
    out = tmp_path / name.replace(".yml", "-out")
    result = CliRunner().invoke(main, ["run", str(recipe), str(out), "--quiet"])
    return result.exit_code, result.output, out


ARCEE = "merge_method: arcee_fusion\nbase_model: {base}\nmodels:\n  - model: {math}\ndtype: {dtype}\n"
RAM = (
    "merge_method: {method}\nbase_model: {{base}}\nmodels:\n  - model: {{math}}\n  - model: {{code}}\n"
    "  - model: {{instruct}}\nparameters: {parameters}\n"
)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_arcee_fusion_recipe(tmp_path: Path, family: dict[str, Path], dtype: str) -> None:
    """Every tensor of a merged tiny Llama is the reference's, in the recipe's dtype (mergekit writes float32
    for bfloat16, its issue #604)."""
    code, output, out = run(tmp_path, family, ARCEE.replace("{dtype}", dtype))
    assert code == 0, output
    torch_dtype = getattr(torch, dtype)
    merged, base, theta = ref.load_all(out), ref.load_all(family["base"]), ref.load_all(family["math"])
    assert set(merged) == set(base)
    for name, tensor in merged.items():
        assert tensor.dtype == torch_dtype, name
        expected, ambiguous = ref.arcee_fusion(ref.f64(theta[name], torch_dtype), ref.f64(base[name], torch_dtype))
        assert int(ambiguous.sum()) <= max(1, tensor.numel() // 1000), name
        ref.assert_close(tensor, expected, torch_dtype, name, skip=ambiguous)


@pytest.mark.parametrize(
    ("method", "parameters"),
    [("ram", {}), ("ram", {"epsilon": 1e-3}), ("ramplus_tl", {}), ("ramplus_tl", {"epsilon": 1e-3, "r": 0.5})],
)
def test_ram_recipe(tmp_path: Path, family: dict[str, Path], method: str, parameters: dict[str, float]) -> None:
    """Fine-tunes of the tiny family change every entry by ~1e-3: ε = 1e-5 shares everything, 1e-3 splits."""
    text = RAM.format(method=method, parameters="{" + ", ".join(f"{k}: {v}" for k, v in parameters.items()) + "}")
    code, output, out = run(tmp_path, family, text)
    assert code == 0, output
    merged = ref.load_all(out)
    inputs = {k: ref.load_all(family[k]) for k in ("base", "math", "code", "instruct")}
    epsilon = parameters.get("epsilon", 1e-5)
    r, alpha = (parameters.get("r", 0.1), 0.2) if method == "ramplus_tl" else (None, None)
    assert set(merged) == set(inputs["base"])
    for name, tensor in merged.items():
        assert tensor.dtype == torch.float32, name
        thetas = [ref.f64(inputs[k][name]) for k in ("math", "code", "instruct")]
        base = ref.f64(inputs["base"][name])
        near = np.zeros(base.shape, dtype=bool)
        for theta in thetas:  # an entry whose change is within rounding of ε may go either way
            near |= np.abs(np.abs(theta - base) - epsilon) <= 1e-6 * epsilon + 1e-9
        ref.assert_close(tensor, ref.ram(thetas, base, epsilon, r, alpha), torch.float32, name, skip=near)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "merge_method: arcee_fusion\nbase_model: {base}\nmodels:\n  - model: {math}\n  - model: {code}\n",
            "arcee_fusion takes 1 input model(s) besides the base, got 2",
        ),
        ("merge_method: arcee_fusion\nmodels:\n  - model: {math}\n", "arcee_fusion needs a base_model"),
        (RAM.format(method="ram", parameters="{epsilon: -0.1}"), "epsilon must be ≥ 0, got -0.1"),
        (RAM.format(method="ramplus_tl", parameters="{alpha: -1}"), "alpha must be ≥ 0, got -1"),
        (RAM.format(method="ram", parameters="{r: 0.5}"), "unknown parameter for ram"),
    ],
)
def test_bad_recipes_fail_in_one_line(tmp_path: Path, family: dict[str, Path], text: str, message: str) -> None:
    code, output, out = run(tmp_path, family, text)
    assert code == 2
    lines = output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], output
    assert not out.exists()


def test_ram_epsilon_zero_counts_every_change() -> None:
    """ε = 0: every nonzero change is active; a model equal to the base contributes nothing (no NaN)."""
    base = torch.zeros(5)
    models = [torch.tensor([0.0, 1e-30, 2.0, 0.0, 3.0]), base.clone()]
    for name in ("ram", "ramplus_tl"):
        op = OPERATORS[name]
        out = apply(op, make_inputs(op, models, base, global_values={"epsilon": 0.0}))
        assert torch.equal(out, models[0])  # model 0's changes are all unique, ρ = 0, λ = 1
