"""Recipe loading: mergekit's schema, strictness with YAML paths and hints, multi-document stages."""

from __future__ import annotations

import pytest

from gift_merge.errors import GiftMergeError
from gift_merge.recipe import ModelRef, parse_recipe
from gift_merge.recipe.schema import TokenizerSpec
from gift_merge.recipe.settings import Gradient

TIES = """
models:
  - model: org/a
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: org/b
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
merge_method: ties
base_model: org/base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def test_mergekit_ties_recipe_parses() -> None:
    recipe = parse_recipe(TIES)
    stage = recipe.final
    assert stage.merge_method == "ties"
    assert stage.base_model == ModelRef("org/base")
    assert stage.models is not None and [m.model.path for m in stage.models] == ["org/a", "org/b"]
    assert isinstance(stage.models[0].parameters["density"], Gradient)
    assert stage.dtype == "float16"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("org/name", ModelRef("org/name")),
        ("org/name@v1.0", ModelRef("org/name", "v1.0")),
        ("./local+./adapter", ModelRef("./local", None, "./adapter")),
        ("org/m@main+org/lora@abc", ModelRef("org/m", "main", "org/lora", "abc")),
    ],
)
def test_model_references(text: str, expected: ModelRef) -> None:
    assert ModelRef.parse(text, "x") == expected
    assert str(ModelRef.parse(text, "x")) == text


@pytest.mark.parametrize("text", ["a+b+c", "a@b@c", "a@", "", "@rev"])
def test_bad_model_references(text: str) -> None:
    with pytest.raises(GiftMergeError, match="models"):
        ModelRef.parse(text, "models[0].model")


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (
            ("density: 0.5\n", "desnity: 0.5\n"),
            r"models\[1\]\.parameters\.desnity: unknown parameter for ties \(did you mean 'density'\?\)",
        ),
        (("merge_method: ties", "merge_method: tis"), r"merge_method: .*did you mean 'ties'"),
        (("dtype: float16", "dtyp: float16"), r"unknown key 'dtyp' \(did you mean 'dtype'\?\)"),
        (("dtype: float16", "dtype: float17"), r"dtype: unknown dtype 'float17'"),
        (("  normalize: true", "  t: 0.5"), r"parameters\.t: unknown parameter for ties"),
        (
            ("    parameters:\n      density: 0.5", "    parametres:\n      density: 0.5"),
            r"models\[1\]: unknown key 'parametres'",
        ),
    ],
)  # fmt: skip
def test_strict_errors_name_yaml_path(patch: tuple[str, str], message: str) -> None:
    old, new = patch
    assert old in TIES
    with pytest.raises(GiftMergeError, match=message):
        parse_recipe(TIES.replace(old, new, 1))


def test_per_tensor_parameter_under_a_model_is_rejected() -> None:
    text = "merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n    parameters: {t: 0.5}\n"
    with pytest.raises(GiftMergeError, match=r"models\[1\]\.parameters\.t: 't' is one value per tensor"):
        parse_recipe(text)


def test_models_and_slices_are_exclusive() -> None:
    with pytest.raises(GiftMergeError, match="exactly one of 'models' or 'slices'"):
        parse_recipe("merge_method: linear\n")


def test_slices_sources_need_equal_spans() -> None:
    text = """
merge_method: slerp
base_model: a
parameters: {t: 0.5}
slices:
  - sources:
      - {model: a, layer_range: [0, 4]}
      - {model: b, layer_range: [0, 3]}
"""
    with pytest.raises(GiftMergeError, match=r"slices\[0\]: every source of a slice must span the same number"):
        parse_recipe(text)


def test_layer_range_is_checked() -> None:
    text = "merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [3, 1]}\n"
    with pytest.raises(GiftMergeError, match=r"slices\[0\]\.sources\[0\]\.layer_range"):
        parse_recipe(text)


MULTI = """
name: first-merge
merge_method: linear
models:
  - model: m1
  - model: m2
parameters:
  weight: 0.5
---
name: second-merge
merge_method: slerp
base_model: first-merge
models:
  - model: m3
parameters:
  t: 0.5
---
merge_method: dare_ties
base_model: m1
models:
  - model: second-merge
    parameters: {density: 0.6, weight: 0.5}
  - model: m4
    parameters: {density: 0.8, weight: 0.5}
"""


def test_multi_document_stages_in_dependency_order() -> None:
    recipe = parse_recipe(MULTI)
    assert [s.name for s in recipe.stages] == ["first-merge", "second-merge", None]
    second = recipe.stages[1]
    assert second.base_model == ModelRef("first-merge", stage="first-merge")
    assert recipe.final.models is not None
    assert recipe.final.models[0].model.stage == "second-merge"
    assert recipe.final.models[1].model.stage is None
    assert "name: second-merge" in second.text and "dare_ties" not in second.text


def test_multi_document_reordered_and_cycles() -> None:
    docs = MULTI.split("---")
    reordered = parse_recipe("---".join([docs[2], docs[1], docs[0]]))
    assert [s.name for s in reordered.stages] == ["first-merge", "second-merge", None]
    cyclic = MULTI.replace("base_model: first-merge", "base_model: m1").replace(
        "  - model: m2", "  - model: second-merge"
    )
    cyclic = cyclic.replace("  - model: m3", "  - model: first-merge")
    with pytest.raises(GiftMergeError, match="cycle"):
        parse_recipe(cyclic)
    with pytest.raises(GiftMergeError, match="named 'first-merge'"):
        parse_recipe(MULTI.replace("name: second-merge", "name: first-merge"))


def test_tokenizer_and_chat_template() -> None:
    base = "merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1}}\nbase_model: a\n"
    assert parse_recipe(base + "tokenizer_source: base\n").final.tokenizer == TokenizerSpec("base")
    assert parse_recipe(base + "tokenizer: {source: org/tok}\n").final.tokenizer == TokenizerSpec(
        "model", ModelRef("org/tok")
    )
    assert parse_recipe(base + "tokenizer_source: union\n").final.tokenizer == TokenizerSpec("union")
    assert parse_recipe(base + "chat_template: chatml\n").final.chat_template == "chatml"
    with pytest.raises(GiftMergeError, match="chat_template"):
        parse_recipe(base + "chat_template: chatmll\n")


def test_yaml_syntax_error_has_line() -> None:
    with pytest.raises(GiftMergeError, match="invalid YAML at line"):
        parse_recipe("merge_method: linear\nmodels: [\n")


ARCEE_FUSION = """
merge_method: arcee_fusion
base_model: org/base
models:
  - model: org/a
    parameters: {int8_mask: false}
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
"""


def test_arcee_fusion_accepts_and_ignores_what_mergekit_ignores(caplog: pytest.LogCaptureFixture) -> None:
    """mergekit 0.1.5 declares no parameters for arcee_fusion and ignores any a recipe sets; recipes copied
    from TIES carry ``normalize`` and ``int8_mask``, so those load (and are dropped, said at INFO)."""
    with caplog.at_level("INFO", logger="gift_merge"):
        stage = parse_recipe(ARCEE_FUSION).final
    assert stage.merge_method == "arcee_fusion"
    assert stage.parameters == {}
    assert stage.models is not None and stage.models[0].parameters == {}
    ignored = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert ignored == [
        "recipe.models[0].parameters.int8_mask: ignored, as mergekit ignores it for arcee_fusion",
        "recipe.parameters.normalize: ignored, as mergekit ignores it for arcee_fusion",
        "recipe.parameters.int8_mask: ignored, as mergekit ignores it for arcee_fusion",
    ]


@pytest.mark.parametrize("parameter", ["weight: 0.5", "density: 0.5", "normalise: true"])
def test_arcee_fusion_rejects_other_parameters(parameter: str) -> None:
    with pytest.raises(GiftMergeError, match=r"unknown parameter for arcee_fusion"):
        parse_recipe(ARCEE_FUSION.replace("int8_mask: false", parameter))


def test_other_methods_still_reject_parameters_they_do_not_take() -> None:
    text = "merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\nparameters: {t: 0.5, int8_mask: true}\n"
    with pytest.raises(GiftMergeError, match=r"parameters\.int8_mask: unknown parameter for slerp"):
        parse_recipe(text)
