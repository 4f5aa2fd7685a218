"""Parameter settings: gradients, steps and filters mean what mergekit documents."""

from __future__ import annotations

import pytest

from gift_merge.errors import GiftMergeError
from gift_merge.recipe.settings import Constant, Filtered, Gradient, Steps, compile_setting


def interp_reference(anchors: list[float], t: float) -> float:
    """Piecewise-linear interpolation over evenly spaced anchors, written out by hand."""
    n = len(anchors)
    if n == 1:
        return anchors[0]
    for i in range(n - 1):
        lo, hi = i / (n - 1), (i + 1) / (n - 1)
        if lo <= t <= hi:
            f = (t - lo) / (hi - lo)
            return anchors[i] * (1 - f) + anchors[i + 1] * f
    raise AssertionError


@pytest.mark.parametrize("anchors", [[0, 1], [1, 0.7, 0.1], [0, 0.5, 0.3, 0.7, 1], [0.25]])
def test_gradient_is_piecewise_linear(anchors: list[float]) -> None:
    setting = compile_setting(anchors, "p")
    assert isinstance(setting, Gradient)
    for k in range(40):
        t = k / 39
        assert setting.evaluate("x", t) == pytest.approx(interp_reference([float(a) for a in anchors], t), abs=1e-12)


def test_gradient_endpoints_and_midpoints() -> None:
    setting = compile_setting([0, 0.3, 0.7, 1], "w")
    assert setting.evaluate("x", 0.0) == 0
    assert setting.evaluate("x", 1.0) == 1
    assert setting.evaluate("x", 1 / 3) == pytest.approx(0.3)
    assert setting.evaluate("x", 0.5) == pytest.approx(0.5)


def test_filters_first_match_wins_and_fall_through() -> None:
    setting = compile_setting([{"filter": "mlp", "value": 0.5}, {"filter": "self_attn", "value": [0, 1]}], "w")
    assert isinstance(setting, Filtered)
    assert setting.evaluate("model.layers.0.mlp.up_proj.weight", 0.3) == 0.5
    assert setting.evaluate("model.layers.0.self_attn.q_proj.weight", 0.25) == pytest.approx(0.25)
    assert setting.evaluate("model.norm.weight", 0.0) is None  # falls through to the next level


def test_filter_without_pattern_and_star_match_everything() -> None:
    assert compile_setting([{"filter": "*", "value": 2}], "w").evaluate("anything", 0) == 2
    assert compile_setting([{"filter": "mlp", "value": 1}, {"value": 3}], "w").evaluate("norm", 0) == 3


def test_steps_for_booleans() -> None:
    setting = compile_setting([True, False], "normalize")
    assert isinstance(setting, Steps)
    assert setting.evaluate("x", 0.2) is True
    assert setting.evaluate("x", 1.0) is False


def test_scalars() -> None:
    assert compile_setting(0.5, "w") == Constant(0.5)
    assert compile_setting(True, "n") == Constant(True)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "empty list"),
        ([1, "a"], "only numbers"),
        ([{"filter": "mlp", "valeu": 1}], "unknown key 'valeu'"),
        ([{"filter": "mlp"}], "missing 'value'"),
        ({"filter": "mlp", "value": [{"value": 1}]}, "cannot nest"),
        (None, "expected a number"),
    ],
)
def test_malformed_settings_name_their_path(raw: object, message: str) -> None:
    with pytest.raises(GiftMergeError, match=message) as info:
        compile_setting(raw, "models[0].parameters.weight")
    assert "models[0].parameters.weight" in str(info.value)
