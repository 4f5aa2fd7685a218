"""Random recipes, safetensors headers and data rows: the CLI answers with exit 0 or one line and exit 2,
never a traceback."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gift_merge.cli import main

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KEYS = ["merge_method", "base_model", "models", "model", "parameters", "weight", "density", "dtype", "slices",
        "sources", "layer_range", "name", "output", "train", "compare", "arms", "tasks", "sweep", "t", "normalize"]  # fmt: skip
METHODS = ["linear", "ties", "slerp", "gift", "task_arithmetic", "dare_ties", "passthrough", "nope"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(METHODS), st.text(max_size=12),
)  # fmt: skip
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=25,
)


def _answers_cleanly(result) -> None:
    assert result.exit_code in (0, 2), (result.exit_code, result.output, result.exception)
    if result.exit_code == 2:
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output


@FUZZ
@given(docs=st.lists(documents, min_size=1, max_size=3))
def test_random_recipes(tmp_path: Path, docs: list) -> None:
    recipe = tmp_path / "fuzz.yaml"
    recipe.write_text("---\n".join(yaml.safe_dump(d) for d in docs))
    _answers_cleanly(CliRunner().invoke(main, ["validate", str(recipe)]))


@FUZZ
@given(raw=st.binary(max_size=200))
def test_random_recipe_bytes(tmp_path: Path, raw: bytes) -> None:
    recipe = tmp_path / "bytes.yaml"
    recipe.write_bytes(raw)
    _answers_cleanly(CliRunner().invoke(main, ["validate", str(recipe)]))


entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "F8_E4M3", "X9", 3]),
        "shape": st.lists(st.integers(-2, 9), max_size=3) | st.just("x"),
        "data_offsets": st.lists(st.integers(-4, 400), min_size=0, max_size=3),
    }
)


@FUZZ
@given(
    header=st.dictionaries(st.text(min_size=1, max_size=8), entries, max_size=4),
    payload=st.integers(0, 400),
    declared=st.integers(-1, 2000) | st.none(),
)
def test_random_safetensors_headers(
    tmp_path: Path, llama: dict[str, Path], header: dict, payload: int, declared
) -> None:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(Path(llama["base"], "config.json").read_text())
    raw = json.dumps(header).encode()
    length = len(raw) if declared is None else declared
    (model / "model.safetensors").write_bytes(struct.pack("<Q", max(length, 0)) + raw + b"\0" * payload)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n")
    _answers_cleanly(CliRunner().invoke(main, ["validate", str(recipe)]))
    _answers_cleanly(CliRunner().invoke(main, ["inspect", str(model)]))


rows = st.one_of(
    st.dictionaries(st.sampled_from(["instruction", "response", "prompt", "messages", "scores", "x"]), scalars | st.lists(scalars, max_size=3), max_size=4),
    scalars,
)  # fmt: skip


@FUZZ
@given(lines=st.lists(rows, min_size=0, max_size=4), tail=st.binary(max_size=8))
def test_random_training_data(tmp_path: Path, llama: dict[str, Path], lines: list, tail: bytes) -> None:
    """Data rows are checked when a train stage is planned: validate must answer for every kind of row."""
    data = tmp_path / "data.jsonl"
    data.write_bytes(("\n".join(json.dumps(r) for r in lines) + "\n").encode() + tail)
    recipe = tmp_path / "t.yaml"
    recipe.write_text(f"train:\n  base: {llama['base']}\n  data: {data}\n  mode: sft\n")
    _answers_cleanly(CliRunner().invoke(main, ["validate", str(recipe)]))
