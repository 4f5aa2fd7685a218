"""One contract suite, parametrised over every registered operator.

The generic contract (purity, shapes, determinism, docstrings) runs over the whole registry, including
operators other modules add; the parity tables pin the mergekit methods' names, defaults and roles.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from gift_merge.operators import OPERATORS, REQUIRED, Operator

from .operator_testing import SHAPES, apply, exercise_values, make_inputs, model_count, random_case

OPS = sorted(OPERATORS)

# mergekit's parameter names and defaults (REQUIRED where mergekit requires the key).
GTA = {"weight": REQUIRED, "density": 1.0, "lambda": 1.0, "int8_mask": False}
EXPECTED_PARAMS: dict[str, dict[str, object]] = {
    "linear": {"weight": REQUIRED, "normalize": True},
    "task_arithmetic": {**GTA, "normalize": False, "rescale": False},
    "ties": {**GTA, "normalize": True, "rescale": False},
    "dare_linear": {**GTA, "normalize": False, "rescale": True},
    "dare_ties": {**GTA, "normalize": False, "rescale": True},
    "breadcrumbs": {**GTA, "gamma": 0.01, "normalize": False, "rescale": False},
    "breadcrumbs_ties": {**GTA, "gamma": 0.01, "normalize": False, "rescale": False},
    "della": {**GTA, "epsilon": 0.15, "normalize": True, "rescale": True},
    "della_linear": {**GTA, "epsilon": 0.15, "normalize": False, "rescale": True},
    "slerp": {"t": REQUIRED},
    "nuslerp": {"weight": REQUIRED, "nuslerp_flatten": True, "nuslerp_row_wise": False},
    "multislerp": {"weight": REQUIRED, "normalize_weights": True, "eps": 1e-8},
    "karcher": {"max_iter": 10, "tol": 1e-5},
    "model_stock": {"filter_wise": False},
    "nearswap": {"t": REQUIRED},
    "sce": {"select_topk": 1.0, "int8_mask": False},
    "arcee_fusion": {},
    "ram": {"epsilon": 1e-5},
    "ramplus_tl": {"epsilon": 1e-5, "r": 0.1, "alpha": 0.2},
    "passthrough": {"scale": 1.0},
}
PER_MODEL = {"weight", "density", "gamma", "epsilon", "scale"}
GLOBAL_EPSILON = {"ram", "ramplus_tl"}  # their ε is one value per tensor, as in mergekit

# (base role, min non-base models, max non-base models)
EXPECTED_SHAPE: dict[str, tuple[str, int, int | None]] = {
    **{n: ("required", 1, None) for n in ("task_arithmetic", "ties", "dare_linear", "dare_ties")},
    **{n: ("required", 1, None) for n in ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear")},
    "linear": ("ignored", 1, None),
    "karcher": ("ignored", 1, None),
    "passthrough": ("ignored", 1, 1),
    "slerp": ("required", 1, 1),
    "nearswap": ("required", 1, 1),
    "model_stock": ("required", 2, None),
    "sce": ("required", 1, None),
    "arcee_fusion": ("required", 1, 1),
    "ram": ("required", 1, None),
    "ramplus_tl": ("required", 1, None),
    "nuslerp": ("optional", 2, 2),
    "multislerp": ("optional", 1, None),
}
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}

# Out-of-range values for every checked parameter name; per-operator extras below.
BAD_VALUES: dict[str, list[float]] = {
    "weight": [math.nan, math.inf],
    "density": [0.0, -0.1, 1.5, math.nan],
    "gamma": [-0.01, 1.0, 1.5],
    "epsilon": [-0.1, math.inf],
    "lambda": [math.nan],
    "t": [-0.1, math.nan],
    "select_topk": [0.0, 1.5],
    "eps": [0.0, -1.0],
    "max_iter": [-1],
    "tol": [-1e-3],
    "r": [-0.1, math.inf],
    "alpha": [-0.1, math.nan],
    "scale": [math.nan],
    "rescale": [True],  # only task_arithmetic checks it: it prunes nothing
}
BAD_EXTRA = {("slerp", "t"): [1.1], ("task_arithmetic", "density"): [0.5]}
GOOD_EXTRA = {
    ("nearswap", "t"): [0.0, 5.0],
    ("slerp", "t"): [0.0, 1.0],
    ("*", "density"): [1e-6, 0.5, 1.0],
    ("task_arithmetic", "density"): [1.0],
    ("task_arithmetic", "rescale"): [False],
    **{(name, "epsilon"): [0.0, 1e-5, 2.0] for name in ("ram", "ramplus_tl")},
    ("ramplus_tl", "r"): [0.0, 0.1, 3.0],
    ("ramplus_tl", "alpha"): [0.0, 0.2, 10.0],
}


def build(op: Operator, shape: tuple[int, ...], seed: int = 0, gen_seed: int | None = 0):
    n = model_count(op)
    base, models = random_case(shape, n, seed)
    model_values, global_values = exercise_values(op, n, seed)
    return make_inputs(op, models, base if op.base != "ignored" else None, model_values, global_values, gen_seed)


def test_registry_lists_every_mergekit_method() -> None:
    assert set(EXPECTED_PARAMS) <= set(OPERATORS)
    assert all(name == op.name for name, op in OPERATORS.items())


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_params_match_mergekit(name: str) -> None:
    op = OPERATORS[name]
    assert {p.name: p.default for p in op.params} == EXPECTED_PARAMS[name]
    per_model = PER_MODEL - ({"epsilon"} if name in GLOBAL_EPSILON else set())
    assert {p.name for p in op.model_params} == per_model & set(EXPECTED_PARAMS[name])


@pytest.mark.parametrize("name", OPS)
def test_params_are_well_formed(name: str) -> None:
    op = OPERATORS[name]
    assert len({p.name for p in op.params}) == len(op.params)
    for p in op.params:
        assert p.kind in (float, bool, int) and p.doc
        if not p.required:
            assert isinstance(p.default, p.kind) and (p.check is None or p.check(p.default) is None)


@pytest.mark.parametrize("name", sorted(EXPECTED_SHAPE))
def test_base_role_and_model_counts(name: str) -> None:
    op = OPERATORS[name]
    assert (op.base, op.min_models, op.max_models) == EXPECTED_SHAPE[name]
    assert op.random == (name in RANDOM)


@pytest.mark.parametrize("name", OPS)
def test_docstring_has_formula_and_paper(name: str) -> None:
    op = OPERATORS[name]
    doc = sys.modules[op.merge.__module__].__doc__ or ""
    assert "θ" in doc and "=" in doc, "module docstring must state the formula"
    assert op.summary
    if name != "passthrough":  # a copy has no paper
        assert op.paper.startswith("https://") and op.paper in doc


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", OPS)
def test_shape_dtype_and_purity(name: str, shape: tuple[int, ...]) -> None:
    op = OPERATORS[name]
    inputs = build(op, shape)
    before = [t.clone() for t in inputs.tensors] + ([inputs.base.clone()] if inputs.base is not None else [])
    out = apply(op, inputs)
    assert out.shape == torch.Size(shape) and out.dtype == torch.float32 and out.device == inputs.tensors[0].device
    assert torch.isfinite(out).all()
    after = list(inputs.tensors) + ([inputs.base] if inputs.base is not None else [])
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "inputs were modified"
    assert all(out.data_ptr() != t.data_ptr() for t in after), "output aliases an input"


@pytest.mark.parametrize("name", OPS)
def test_deterministic_for_a_seed(name: str) -> None:
    op = OPERATORS[name]
    assert torch.equal(apply(op, build(op, (16, 24))), apply(op, build(op, (16, 24))))


@pytest.mark.parametrize("name", [n for n in OPS if OPERATORS[n].random])
def test_random_ops_depend_on_the_seed(name: str) -> None:
    op = OPERATORS[name]
    assert not torch.equal(apply(op, build(op, (16, 24), gen_seed=0)), apply(op, build(op, (16, 24), gen_seed=1)))
    with pytest.raises(ValueError, match="generator"):
        apply(op, build(op, (16, 24), gen_seed=None))


@pytest.mark.parametrize("name", [n for n in OPS if not OPERATORS[n].random])
def test_deterministic_ops_need_no_generator(name: str) -> None:
    op = OPERATORS[name]
    assert torch.equal(apply(op, build(op, (8, 8), gen_seed=None)), apply(op, build(op, (8, 8), gen_seed=3)))


@pytest.mark.parametrize("name", [n for n in OPS if any(p.name == "int8_mask" for p in OPERATORS[n].params)])
def test_int8_mask_has_no_numeric_effect(name: str) -> None:
    op = OPERATORS[name]
    inputs = build(op, (9, 11))
    flipped = make_inputs(
        op, inputs.tensors, inputs.base, inputs.model_params, {**inputs.params, "int8_mask": True}, seed=0
    )
    assert torch.equal(apply(op, inputs), apply(op, flipped))


CHECKED = sorted((n, p.name) for n in EXPECTED_PARAMS for p in OPERATORS[n].params if p.check is not None)


@pytest.mark.parametrize(("name", "param"), CHECKED)
def test_param_checks_reject_out_of_range(name: str, param: str) -> None:
    p = next(p for p in OPERATORS[name].params if p.name == param)
    assert param in BAD_VALUES, f"add out-of-range values for {param!r} to BAD_VALUES"
    for value in BAD_VALUES[param] + BAD_EXTRA.get((name, param), []):
        message = p.check(value)
        assert message, f"{name}.{param} accepted {value}"
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        assert "\n" not in message and message.startswith(param) and f"got {shown}" in message
    good = GOOD_EXTRA.get((name, param), GOOD_EXTRA.get(("*", param), []))
    for value in good:
        assert p.check(value) is None, f"{name}.{param} rejected {value}"


def test_density_message_format() -> None:
    density = next(p for p in OPERATORS["ties"].params if p.name == "density")
    assert density.check(1.5) == "density must be in (0, 1], got 1.5"
