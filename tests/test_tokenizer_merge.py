"""Vocabulary merges (``tokenizer_source`` / ``tokenizer:``), checked row by row against a float64 reference.

The reference below applies mergekit's rules plainly, token by token: each input re-indexed to the output
vocabulary (its own row where it has the token and the token is not forced; otherwise the token's
``tokens`` source, the only input that has it, zeros, the base's row, or the mean of the inputs that have
it), padding rows the input's own spare row or the mean of its re-indexed token rows; then the method's
formula. The expected vocabularies are written out by hand from ``tests/tokenizer_zoo.py``'s word lists.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from gift_merge.cli import main
from gift_merge.errors import GiftMergeError
from gift_merge.recipe import parse_recipe
from gift_merge.recipe.loader import load_recipe
from tests import reference as ref
from tests.tokenizer_zoo import build_zoo, set_rows

BASE = ["<unk>", "<s>", "</s>", "the", "cat", "dog", "sat", "on", "mat", "a", "<|im_start|>", "<|im_end|>"]
M1 = ["<unk>", "<s>", "</s>", "cat", "the", "bird", "sat", "tree", "<|im_start|>", "<|tool|>"]
# base first; then m1's and m2's plain tokens the base lacks, in each model's id order; then added tokens
UNION = [*BASE, "bird", "tree", "fish", "<|tool|>", "<|m2_only|>"]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def tied_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_zoo(tmp_path_factory.mktemp("tied"), arch="qwen2")


def run(tmp_path: Path, text: str, *options: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(recipe), str(out), "-q", *options])
    assert result.exit_code == 0, result.output
    return out


def vocab_of(folder: Path) -> dict[str, int]:
    """token → id from ``tokenizer.json`` read as plain JSON (the model's vocabulary and its added tokens)."""
    document = json.loads((folder / "tokenizer.json").read_text())
    ids = dict(document["model"]["vocab"])
    ids.update({t["content"]: t["id"] for t in document["added_tokens"]})
    return ids


def inputs_of(zoo: dict[str, Path], names: list[str], tensor: str) -> dict[str, tuple[dict[str, int], np.ndarray]]:
    """Each input's vocabulary (cut at its config's vocab_size) and its ``tensor`` in float64."""
    result = {}
    for name in names:
        limit = json.loads((zoo[name] / "config.json").read_text())["vocab_size"]
        vocab = {t: i for t, i in vocab_of(zoo[name]).items() if i < limit}
        result[name] = (vocab, ref.f64(ref.load_all(zoo[name])[tensor]))
    return result


def reindexed(
    inputs: dict[str, tuple[dict[str, int], np.ndarray]], tokens: list[str], base: str | None, rows: int,
    config: dict[str, dict[str, Any]] | None = None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Every input's matrix in the output vocabulary ``tokens`` (by id), by mergekit's rule list.

    ``config`` maps a token to ``{"source": name | ("model_token", name, token or id) | "zero", "force": bool}``."""
    config = config or {}
    width = next(iter(inputs.values()))[1].shape[1]

    def row(name: str, token: str) -> np.ndarray:
        vocab, matrix = inputs[name]
        return matrix[vocab[token]]

    def fill(token: str) -> np.ndarray:
        source = config.get(token, {}).get("source")
        if source == "zero":
            return np.zeros(width)
        if isinstance(source, tuple):
            _, name, other = source
            vocab, matrix = inputs[name]
            return matrix[vocab[other] if isinstance(other, str) else other]
        if source is not None:
            return row(source, token)
        holders = [name for name, (vocab, _) in inputs.items() if token in vocab]
        if len(holders) == 1:
            return row(holders[0], token)
        if not holders:
            return np.zeros(width)
        if base in holders:
            return row(base, token)
        return sum(row(name, token) for name in holders) / len(holders)

    result = {}
    for name, (vocab, matrix) in inputs.items():
        new = np.zeros((rows, width))
        for t, token in enumerate(tokens):
            forced = config.get(token, {}).get("force", False)
            new[t] = row(name, token) if token in vocab and not forced else fill(token)
        used = set(vocab.values())
        for r in range(len(tokens), rows):
            new[r] = matrix[r] if r < matrix.shape[0] and r not in used else new[: len(tokens)].mean(axis=0)
        result[name] = new
    return result


def check(out: Path, tensor: str, expected: np.ndarray) -> None:
    got = ref.f64(ref.load_all(out)[tensor])
    assert got.shape == expected.shape, tensor
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8, err_msg=tensor)


TOKENS = {
    "<|new|>": {"source": "zero"},
    "cat": {"source": "m1", "force": True},
    "dog": {"source": ("model_token", "m2", "fish")},
    "<|tool|>": {"source": ("model_token", "m1", 3), "force": True},
}


def test_union_with_tokens_and_padding(tmp_path: Path, zoo: dict[str, Path]) -> None:
    text = f"""merge_method: task_arithmetic
base_model: {zoo["base"]}
models:
  - {{model: {zoo["m1"]}, parameters: {{weight: 1.0}}}}
  - {{model: {zoo["m2"]}, parameters: {{weight: 0.5}}}}
tokenizer:
  source: union
  pad_to_multiple_of: 8
  tokens:
    "<|new|>": {{source: {{kind: zero}}}}
    cat: {{source: {zoo["m1"]}, force: true}}
    dog: {{source: {{kind: model_token, model: {zoo["m2"]}, token: fish}}}}
    "<|tool|>": {{source: {{kind: model_token, model: {zoo["m1"]}, token_id: 3}}, force: true}}
"""
    out = run(tmp_path, text)
    tokens = [*UNION, "<|new|>"]
    for tensor in (EMBED, HEAD):
        x = reindexed(inputs_of(zoo, ["m1", "m2", "base"], tensor), tokens, "base", 24, TOKENS)
        check(out, tensor, x["base"] + 1.0 * (x["m1"] - x["base"]) + 0.5 * (x["m2"] - x["base"]))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 24
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == {t: i for i, t in enumerate(tokens)}
    assert tok("the fish <|tool|> tree <|m2_only|>")["input_ids"] == [3, 14, 15, 13, 16]
    assert tok.added_tokens_decoder[15].special and not tok.added_tokens_decoder[16].special
    assert tok.decode([3, 15, 16], skip_special_tokens=True) == "the <|m2_only|>"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi"
    assert not (out / "tokenizer.model").exists()


def test_union_linear_takes_the_listed_base_and_means(tmp_path: Path, zoo: dict[str, Path]) -> None:
    """Three models, the base listed: rows two non-base inputs share are their mean; rows the base has, the base's."""
    text = f"""merge_method: linear
base_model: {zoo["base"]}
models:
  - {{model: {zoo["m2"]}, parameters: {{weight: 2.0}}}}
  - {{model: {zoo["base"]}, parameters: {{weight: 1.0}}}}
  - {{model: {zoo["m1"]}, parameters: {{weight: 1.0}}}}
tokenizer_source: union
"""
    out = run(tmp_path, text)
    union = [*BASE, "bird", "fish", "tree", "<|tool|>", "<|m2_only|>"]  # m2 comes first in this recipe
    for tensor in (EMBED, HEAD):
        x = reindexed(inputs_of(zoo, ["m2", "base", "m1"], tensor), union, "base", len(union))
        check(out, tensor, ref.linear([x["m2"], x["base"], x["m1"]], [2.0, 1.0, 1.0]))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == {t: i for i, t in enumerate(union)}
    assert tok.added_tokens_decoder[15].lstrip  # m2's definition of <|tool|>, the first in recipe order


def test_base_source_keeps_a_padded_embedding(tmp_path: Path, zoo: dict[str, Path]) -> None:
    """A base padded past its tokenizer (as Qwen2.5 is) keeps its row count and its own padding rows."""
    padded = shutil.copytree(zoo["base"], tmp_path / "padded")
    set_rows(padded, 16, seed=5)
    models = {**zoo, "base": padded}
    text = f"""merge_method: task_arithmetic
base_model: {padded}
models:
  - {{model: {zoo["m1"]}, parameters: {{weight: 0.7}}}}
tokenizer_source: base
"""
    out = run(tmp_path, text)
    for tensor in (EMBED, HEAD):
        x = reindexed(inputs_of(models, ["m1", "base"], tensor), BASE, "base", 16)
        check(out, tensor, x["base"] + 0.7 * (x["m1"] - x["base"]))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 16
    assert (out / "tokenizer.json").read_bytes() == (padded / "tokenizer.json").read_bytes()


def test_base_source_cuts_the_tokenizer_to_vocab_size(tmp_path: Path, zoo: dict[str, Path]) -> None:
    """Tokens of the base's tokenizer past its config's vocab_size (rows it lacks) leave the vocabulary."""
    short = shutil.copytree(zoo["base"], tmp_path / "short")
    set_rows(short, 11)
    text = f"""merge_method: linear
base_model: {short}
models:
  - {{model: {short}, parameters: {{weight: 1.0}}}}
  - {{model: {zoo["m1"]}, parameters: {{weight: 1.0}}}}
tokenizer_source: base
"""
    out = run(tmp_path, text)
    x = reindexed(inputs_of({**zoo, "base": short}, ["base", "m1"], EMBED), BASE[:11], "base", 11)
    check(out, EMBED, ref.linear([x["base"], x["m1"]], [1.0, 1.0]))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == {t: i for i, t in enumerate(BASE[:11])}
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 11


def test_model_source(tmp_path: Path, zoo: dict[str, Path]) -> None:
    text = f"""merge_method: task_arithmetic
base_model: {zoo["base"]}
models:
  - {{model: {zoo["m1"]}, parameters: {{weight: 0.5}}}}
  - {{model: {zoo["m2"]}, parameters: {{weight: 0.5}}}}
tokenizer:
  source: {zoo["m1"]}
"""
    out = run(tmp_path, text)
    for tensor in (EMBED, HEAD):
        x = reindexed(inputs_of(zoo, ["m1", "m2", "base"], tensor), M1, "base", len(M1))
        check(out, tensor, x["base"] + 0.5 * (x["m1"] - x["base"]) + 0.5 * (x["m2"] - x["base"]))
    assert (out / "tokenizer.json").read_bytes() == (zoo["m1"] / "tokenizer.json").read_bytes()


def test_tied_embeddings_stay_tied(tmp_path: Path, tied_zoo: dict[str, Path]) -> None:
    text = f"""merge_method: task_arithmetic
base_model: {tied_zoo["base"]}
models:
  - {{model: {tied_zoo["m1"]}, parameters: {{weight: 1.0}}}}
  - {{model: {tied_zoo["m2"]}, parameters: {{weight: 1.0}}}}
tokenizer_source: union
"""
    out = run(tmp_path, text)
    x = reindexed(inputs_of(tied_zoo, ["m1", "m2", "base"], EMBED), UNION, "base", len(UNION))
    check(out, EMBED, x["base"] + (x["m1"] - x["base"]) + (x["m2"] - x["base"]))
    assert HEAD not in ref.load_all(out)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["vocab_size"] == len(UNION)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model(torch.tensor([[3, 15]])).logits.shape == (1, 2, len(UNION))


@pytest.mark.parametrize("method", ["ties", "slerp"])
def test_every_engine_writes_the_same_remapped_bytes(tmp_path: Path, zoo: dict[str, Path], method: str) -> None:
    """Methods with whole-tensor statistics read re-indexed rows in slices of their own: numpy and torch agree."""
    params = "parameters: {t: 0.3}\n" if method == "slerp" else "parameters: {density: 0.5}\n"
    weight = "" if method == "slerp" else ", parameters: {weight: 1.0}"
    text = (
        f"merge_method: {method}\nbase_model: {zoo['base']}\nmodels:\n  - {{model: {zoo['m2']}{weight}}}\n"
        f"{params}tokenizer: {{source: union, pad_to_multiple_of: 32}}\n"
    )
    numpy_out = run(tmp_path / "numpy", text)
    torch_out = run(tmp_path / "torch", text, "--engine", "torch")
    for name in (EMBED, HEAD):
        a, b = ref.load_all(numpy_out)[name], ref.load_all(torch_out)[name]
        assert a.shape[0] == 32 and torch.equal(a, b), name


def test_shared_tokenizers_leave_rows_in_place(llama: dict[str, Path]) -> None:
    from gift_merge.merge import plan_recipe

    text = f"merge_method: linear\nmodels:\n  - {{model: {llama['math']}, parameters: {{weight: 1}}}}\n  - {{model: {llama['code']}, parameters: {{weight: 1}}}}\ntokenizer_source: union\n"
    (plan,) = plan_recipe(parse_recipe(text))
    assert all(job.row_map is None for job in plan.jobs)
    assert plan.vocabulary is not None and not plan.vocabulary.rebuild
    assert plan.config["vocab_size"] == json.loads((llama["math"] / "config.json").read_text())["vocab_size"]


def test_a_later_stage_merges_a_planned_stages_vocabulary(tmp_path: Path, zoo: dict[str, Path]) -> None:
    from gift_merge.merge import plan_recipe

    text = f"""name: first
merge_method: linear
models:
  - {{model: {zoo["m1"]}, parameters: {{weight: 1.0}}}}
---
merge_method: task_arithmetic
base_model: {zoo["base"]}
models:
  - {{model: first, parameters: {{weight: 1.0}}}}
tokenizer_source: union
"""
    (tmp_path / "r.yaml").write_text(text)
    plans = plan_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "out")
    merged = plans[-1].vocabulary
    assert merged is not None
    assert dict(merged.ids) == {t: i for i, t in enumerate([*BASE, "bird", "tree", "<|tool|>"])}


ERRORS = [
    ("tokenizer: {source: union, tokens: [a]}", r"tokenizer\.tokens: expected a mapping"),
    ("tokenizer: {source: union, pad_to_multiple_of: 0}", r"tokenizer\.pad_to_multiple_of: expected a whole number"),
    ("tokenizer: {source: union, pad_to_multiple_of: true}", r"tokenizer\.pad_to_multiple_of"),
    ("tokenizer: {tokens: {x: {force: true}}}", r"tokenizer\.tokens\.x\.force: .*needs a 'source'"),
    ("tokenizer: {tokens: {x: {forse: true}}}", r"tokenizer\.tokens\.x: unknown key 'forse'"),
    (
        "tokenizer: {tokens: {x: {source: {kind: zeros}}}}",
        r"tokenizer\.tokens\.x\.source\.kind: unknown kind 'zeros'.*'zero'",
    ),
    (
        "tokenizer: {tokens: {x: {source: {kind: model_token, model: a}}}}",
        r"source: give exactly one of 'token' and 'token_id'",
    ),
    ("tokenizer: {tokens: {x: {source: {kind: model_token, model: a, token: y, token_id: 1}}}}", "exactly one"),
    ("tokenizer: {tokens: {x: {source: {kind: model_token, model: a, token_id: -1}}}}", r"source\.token_id: expected"),
    ("tokenizer: {tokens: {x: {source: {kind: model_token, token: y}}}}", r"source\.model: missing"),
    ("tokenizer: {tokens: {x: {source: {kind: zero, model: a}}}}", r"source: unknown key 'model'"),
    ("tokenizer: {tokens: {1: {}}}", r"tokenizer\.tokens: 1 is not a token"),
    ("tokenizer: {source: union}\ntokenizer_source: base", "not both"),
    ("tokenizer: {sorce: union}", r"tokenizer: unknown key 'sorce'"),
]


@pytest.mark.parametrize(("extra", "message"), ERRORS)
def test_recipe_errors_name_the_key(extra: str, message: str) -> None:
    text = "merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1}}\n" + extra + "\n"
    with pytest.raises(GiftMergeError, match=message):
        parse_recipe(text)


def test_every_form_parses() -> None:
    from gift_merge.recipe import ModelRef
    from gift_merge.recipe.schema import TokenizerSpec, TokenSource, TokenSpec

    text = """merge_method: linear
models:
  - {model: a, parameters: {weight: 1}}
tokenizer:
  pad_to_multiple_of: 64
  tokens:
    x: {}
    y: {source: b}
    z: {source: {kind: model_token, model: b, token: q}, force: true}
    w: {source: {kind: model_token, model: {model: {path: b}}, token_id: 0}}
    v: {source: {kind: zero}, force: true}
"""
    spec = parse_recipe(text).final.tokenizer
    assert spec == TokenizerSpec(
        "union",
        None,
        {
            "x": TokenSpec(),
            "y": TokenSpec(TokenSource("model", ModelRef("b"))),
            "z": TokenSpec(TokenSource("model_token", ModelRef("b"), token="q"), force=True),
            "w": TokenSpec(TokenSource("model_token", ModelRef("b"), token_id=0)),
            "v": TokenSpec(TokenSource("zero"), force=True),
        },
        64,
    )
    assert [str(r) for r in spec.references()] == ["b", "b", "b"]


def test_plan_errors_name_the_token(tmp_path: Path, zoo: dict[str, Path]) -> None:
    from gift_merge.merge import plan_recipe

    head = f"merge_method: task_arithmetic\nbase_model: {zoo['base']}\nmodels:\n  - {{model: {zoo['m1']}, parameters: {{weight: 1}}}}\n"
    cases = [
        (
            f"tokenizer: {{tokens: {{dog: {{source: {zoo['m2']}}}}}}}",
            r"tokenizer\.tokens\.dog\.source: .*m2 is not one of",
        ),
        (f"tokenizer: {{tokens: {{dog: {{source: {zoo['m1']}}}}}}}", r"tokens\.dog\.source: .*m1 has no token 'dog'"),
        (
            f"tokenizer: {{tokens: {{dog: {{source: {{kind: model_token, model: {zoo['m1']}, token: nope}}}}}}}}",
            r"tokens\.dog\.source\.token: .*m1 has no token 'nope'",
        ),
        (
            f"tokenizer: {{tokens: {{dog: {{source: {{kind: model_token, model: {zoo['m1']}, token_id: 99}}}}}}}}",
            r"tokens\.dog\.source: row 99 is past the 10 rows",
        ),
    ]
    for extra, message in cases:
        with pytest.raises(GiftMergeError, match=message):
            plan_recipe(parse_recipe(head + extra + "\n"), tmp_path / "out")


def test_remapped_rows_are_the_same_however_they_are_sliced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Own runs, every kind of fill, spare and mean padding rows: any slicing reads the bits of one whole read."""
    from gift_merge.engine import remap as remap_module
    from gift_merge.engine.backend import NUMPY
    from gift_merge.vocab import FILL_MEAN, FILL_ZERO, OWN_FILL, OWN_PAD_MEAN, RowMap

    class Plain:
        def __init__(self, values: np.ndarray) -> None:
            self.values = values.reshape(-1)

        def read(self, part: slice) -> np.ndarray:
            return self.values[part]

    gen = np.random.default_rng(0)
    a, b, c = (gen.standard_normal((n, 3)).astype(np.float32) for n in (6, 9, 4))
    F, P = OWN_FILL, OWN_PAD_MEAN
    own = (
        np.array([0, 1, 2, F, F, F, 5, P, P, P]),
        np.array([3, 4, 5, 0, F, 2, F, 7, 8, P]),
        np.array([0, 1, 2, 3, F, 1, F, P, P, P]),
    )
    fill_from = np.array([0, 0, 0, 1, FILL_ZERO, FILL_MEAN, 0, 0, 0, 0])
    fill_row = np.array([0, 0, 0, 8, 0, 0, 4, 0, 0, 0])
    is_token = np.array([True] * 7 + [False] * 3)
    row_map = RowMap(10, own, fill_from, fill_row, is_token)
    inputs = [Plain(a), Plain(b), Plain(c)]
    # input a: own rows, b's row 8, zeros, the mean of b's and c's rows (added from zero), own, then its mean
    token_a = np.stack([a[0], a[1], a[2], b[8], np.zeros(3), (np.float32(0) + b[2] + c[1]) / np.float32(2), a[5]])
    mean_a = token_a.astype(np.float64).mean(axis=0).astype(np.float32)
    expected_a = np.concatenate([token_a, np.stack([mean_a] * 3)])

    def whole(k: int) -> np.ndarray:
        return remap_module.remap(NUMPY, inputs, row_map, (10, 3))[k].read(slice(0, 30))

    np.testing.assert_array_equal(whole(0).reshape(10, 3), expected_a)
    np.testing.assert_array_equal(whole(1).reshape(10, 3)[6:9], np.stack([a[4], b[7], b[8]]))
    for rows in (1, 2, 3, 7):
        monkeypatch.setattr(remap_module, "rows_per_block", lambda shape, rows=rows: rows)
        monkeypatch.setattr(remap_module, "MEAN_ROWS", rows)
        for k in (0, 1, 2):
            source = remap_module.remap(NUMPY, inputs, row_map, (10, 3))[k]
            for size in (1, 4, 5, 11, 30):
                parts = [source.read(slice(i, min(i + size, 30))) for i in range(0, 30, size)]
                np.testing.assert_array_equal(np.concatenate(parts), whole(k), err_msg=f"{rows} rows, slices of {size}")


def test_a_chunked_run_writes_the_same_bytes(
    tmp_path: Path, zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gift_merge.engine import blocks
    from gift_merge.operators import base as operator_base

    text = (
        f"merge_method: ties\nbase_model: {zoo['base']}\nmodels:\n  - {{model: {zoo['m1']}, parameters: {{weight: 1.0}}}}\n"
        f"  - {{model: {zoo['m2']}, parameters: {{weight: 0.5}}}}\nparameters: {{density: 0.6}}\n"
        "tokenizer: {source: union, pad_to_multiple_of: 32}\n"
    )
    whole = ref.load_all(run(tmp_path / "whole", text))
    monkeypatch.setattr(blocks, "CHUNK_FROM", 1)
    monkeypatch.setattr(blocks, "ELEMENTWISE_CHUNK", 37)
    monkeypatch.setattr(operator_base, "CHUNK", 29)
    chunked = ref.load_all(run(tmp_path / "chunked", text))
    for name in (EMBED, HEAD):
        assert torch.equal(whole[name], chunked[name]), name


def test_a_union_merge_never_imports_torch(tmp_path: Path, zoo: dict[str, Path]) -> None:
    """Vocabularies are read and the merged tokenizer written with the tokenizers library alone."""
    import subprocess
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {zoo['base']}\nmodels:\n"
        f"  - {{model: {zoo['m1']}, parameters: {{weight: 1.0}}}}\n"
        "tokenizer: {source: union, pad_to_multiple_of: 8, tokens: {'<|new|>': {}}}\n"
    )
    code = (
        "import sys\nfrom gift_merge.cli import main\n"
        f"try:\n    main(['run', {str(recipe)!r}, {str(tmp_path / 'out')!r}, '-q'])\nexcept SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False False", result.stderr
    assert vocab_of(tmp_path / "out") == {t: i for i, t in enumerate([*BASE, "bird", "tree", "<|tool|>", "<|new|>"])}
