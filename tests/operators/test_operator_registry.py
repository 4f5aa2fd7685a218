"""The registry table, name lookup, and the cross-parameter checks."""

from __future__ import annotations

import pytest

from gift_merge.errors import GiftMergeError
from gift_merge.operators import OPERATORS, Operator, get_operator
from gift_merge.operators import _register as register

from .operator_testing import fill_params


def test_get_operator_returns_the_table_entry() -> None:
    for name, op in OPERATORS.items():
        assert get_operator(name) is op


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(GiftMergeError, match=r"unknown merge method 'dare_tie'; did you mean 'dare_ties'\?"):
        get_operator("dare_tie")
    with pytest.raises(GiftMergeError, match="known methods: arcee_fusion, breadcrumbs, "):
        get_operator("zzzzzz")


def test_duplicate_names_fail_loudly() -> None:
    op = Operator(name="linear", merge=OPERATORS["passthrough"].merge)
    with pytest.raises(ValueError, match="duplicate merge operator name 'linear'"):
        register((OPERATORS["linear"], op))


def run_check(name: str, model_values: list[dict], global_values: dict | None = None) -> str | None:
    op = OPERATORS[name]
    model_params, params = fill_params(op, len(model_values), model_values, global_values)
    assert op.check is not None
    return op.check(params, model_params)


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_keep_probabilities_must_be_probabilities(name: str) -> None:
    ok = [
        {"weight": 1.0, "density": 0.5, "epsilon": 0.15},
        {"weight": 1.0, "density": 0.15, "epsilon": 0.15},  # ρ − ε = 0: smallest entry never kept
        {"weight": 1.0, "density": 0.75, "epsilon": 0.25},  # ρ + ε = 1: largest entry always kept
        {"weight": 1.0, "density": 1.0, "epsilon": 0.9},  # ρ = 1 keeps δ whatever ε
        {"weight": 1.0, "density": 0.3, "epsilon": 0.0},
    ]
    assert run_check(name, ok) is None
    for density, epsilon in [(0.1, 0.15), (0.9, 0.15)]:
        bad = [*ok[:1], {"weight": 1.0, "density": density, "epsilon": epsilon}]
        message = run_check(name, bad)
        assert message is not None and "\n" not in message
        assert f"got density {density} and epsilon {epsilon} for models[1]" in message


def test_linear_rejects_normalizing_by_zero() -> None:
    weights = [{"weight": 1.0}, {"weight": -1.0}]
    assert "sum to 0.0" in (run_check("linear", weights) or "")
    assert run_check("linear", weights, {"normalize": False}) is None
    assert run_check("linear", [{"weight": 0.5}, {"weight": 0.5}]) is None


def test_multislerp_rejects_normalizing_by_zero() -> None:
    weights = [{"weight": 1.0}, {"weight": -1.0}]
    assert "normalize_weights" in (run_check("multislerp", weights) or "")
    assert run_check("multislerp", weights, {"normalize_weights": False}) is None


def test_the_architecture_docs_example_method_runs() -> None:
    """docs/architecture.md's smallest complete method is real code: it registers and merges."""
    import re
    from pathlib import Path

    import torch

    from gift_merge.operators import Operator

    from .operator_testing import apply, make_inputs

    text = (Path(__file__).parents[2] / "docs" / "architecture.md").read_text()
    example = re.search(r"```python\n(.*?)```", text, re.S)
    assert example is not None
    namespace: dict[str, object] = {"__name__": "gift_merge.operators.midpoint"}
    exec(
        compile(example.group(1).replace("from .base", "from gift_merge.operators.base"), "midpoint", "exec"), namespace
    )
    midpoint = namespace["MIDPOINT"]
    assert isinstance(midpoint, Operator)
    base, other = torch.randn(5, 7), torch.randn(5, 7)
    out = apply(midpoint, make_inputs(midpoint, [other], base))
    torch.testing.assert_close(out, base + (other - base) * 0.5, rtol=0, atol=0)


def test_the_readme_lists_every_method_with_its_paper() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Merge methods") : readme.index("## Performance")]
    for op in OPERATORS.values():
        row = next((line for line in section.splitlines() if line.startswith(f"| `{op.name}` |")), None)
        assert row is not None, op.name
        assert (op.paper or "–") in row, op.name
