"""YAML → validated :class:`Recipe`, failing before any tensor is read.

Every unknown key is an error naming its YAML path with a typo hint, unlike mergekit, which ignores
them; a YAML file is data and never names code to run. The one exception is a method's
``Operator.ignores``: parameters mergekit's own recipes carry for a method that declares none of that
name (``normalize`` and ``int8_mask`` on ``arcee_fusion``), accepted and dropped with an INFO line.
mergekit's multi-document recipes (``---`` separated, ``name:`` on all but the final one) become stages
in dependency order. A document with a ``train:`` section instead of ``merge_method`` trains a GIFT/SFT
adapter (the options of ``gift-merge train``), which later documents use by the document's name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from gift_merge.dtypes import parse_dtype
from gift_merge.errors import GiftMergeError
from gift_merge.operators import get_operator
from gift_merge.operators.base import Operator
from gift_merge.recipe.schema import (
    InputModel,
    MergeStage,
    ModelRef,
    Recipe,
    SliceSpec,
    Stage,
    TokenizerSpec,
    TokenSource,
    TokenSpec,
    TrainStage,
)
from gift_merge.recipe.settings import Setting, compile_setting
from gift_merge.suggest import did_you_mean
from gift_merge.train.config import TrainConfig

STAGE_KEYS = (
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "name", "output",
)  # fmt: skip
MODEL_KEYS = ("model", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")
TRAIN_STAGE_KEYS = ("train", "name", "output")
_STAGE_DECIDES = ("out", "overwrite")  # a train stage's output is its stage folder, always replaceable

log = logging.getLogger("gift_merge")


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; relative model paths resolve against its folder."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise GiftMergeError(f"{path}: cannot read recipe ({exc.strerror or exc})") from exc
    try:
        # YAML is UTF-8 whatever the locale says; a stray Latin-1 byte is named, not guessed around
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        byte = f"byte 0x{raw[exc.start]:02x} at offset {exc.start}, line {line}"
        raise GiftMergeError(f"{path}: not UTF-8 ({byte}); save the recipe as UTF-8") from None
    return parse_recipe(text, folder=path.resolve().parent, source=path)


def parse_recipe(text: str, *, folder: Path | None = None, source: Path | None = None) -> Recipe:
    label = str(source) if source else "recipe"
    try:
        documents = [
            (doc, raw) for doc, raw in zip(yaml.safe_load_all(text), _split_documents(text), strict=False) if doc
        ]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # PyYAML's text spans lines
        raise GiftMergeError(f"{label}: invalid YAML{at}: {problem}") from exc
    if not documents:
        raise GiftMergeError(f"{label}: empty recipe")
    from gift_merge.compare.spec import is_compare_document

    multi = len(documents) > 1
    folder = folder or Path.cwd()
    where = [f"{label}" + (f"[document {i + 1}]" if multi else "") for i in range(len(documents))]
    compares = [i for i, (doc, _) in enumerate(documents) if is_compare_document(doc)]
    stages = [
        _parse_document(doc, where[i], raw, folder) for i, (doc, raw) in enumerate(documents) if i not in compares
    ]
    if not compares:
        ordered = _order_stages(stages, label) if multi else stages
        return Recipe(tuple(ordered), folder, source, text)
    return _compare_recipe(stages, [(documents[i][0], where[i]) for i in compares], label, folder, source, text)


def _compare_recipe(
    stages: list[Stage], compares: list[tuple[Any, str]], label: str, folder: Path, source: Path | None, text: str
) -> Recipe:
    """A recipe with a ``compare:`` document: its arms' inline documents join the stages, all named."""
    from gift_merge.compare.spec import parse_compare

    if len(compares) > 1:
        raise GiftMergeError(f"{compares[1][1]}: a recipe holds at most one 'compare:' document")
    unnamed = next((s for s in stages if not s.name), None)
    if unnamed is not None:
        raise GiftMergeError(f"{label}: in a recipe with 'compare:', every other document needs a 'name'")
    spec, extra = parse_compare(compares[0][0], compares[0][1], {s.name for s in stages if s.name})
    stages += [_parse_document(d.doc, d.where, d.text, folder) for d in extra]
    ordered = _order_stages(stages, label) if stages else []
    return Recipe(tuple(ordered), folder, source, text, compare=spec)


def _parse_document(doc: Any, where: str, text: str, folder: Path) -> Stage:
    if isinstance(doc, dict) and "train" in doc:
        if "merge_method" in doc:
            raise GiftMergeError(f"{where}: a document either merges (merge_method) or trains (train), not both")
        return _parse_train_stage(doc, where, text, folder)
    return _parse_stage(doc, where, text)


def _parse_train_stage(doc: Any, where: str, text: str, folder: Path) -> TrainStage:
    doc = check_keys(doc, TRAIN_STAGE_KEYS, where)
    section = doc["train"]
    if not isinstance(section, dict):
        raise GiftMergeError(f"{where}.train: expected a mapping of training options (as `gift-merge train`'s)")
    for key in _STAGE_DECIDES:
        if key in section:
            raise GiftMergeError(
                f"{where}.train.{key}: a recipe's train stage writes its adapter to OUT-stages/<name> "
                "(or, as the last document, to the output); remove it"
            )
    # the placeholder output is replaced by the stage's folder when it runs
    config = TrainConfig.from_mapping({**section, "out": "."}, where=f"{where}.train", folder=folder)
    name = doc.get("name")
    if name is not None and not isinstance(name, str):
        raise GiftMergeError(f"{where}.name: expected a string")
    instruct = section.get("instruct")
    return TrainStage(
        config=config,
        base=_parse_model(section["base"], f"{where}.train.base"),
        instruct=_parse_model(instruct, f"{where}.train.instruct") if instruct is not None else None,
        name=name,
        output=str(doc["output"]) if doc.get("output") is not None else None,
        text=text,
        where=where,
    )


def _split_documents(text: str) -> list[str]:
    """The raw text of each YAML document, recorded in the output next to the merged model."""
    parts: list[str] = []
    current: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.rstrip() == "---":
            parts.append("".join(current))
            current = []
        else:
            current.append(line)
    parts.append("".join(current))
    return [p for p in parts if yaml.safe_load(p) is not None] if len(parts) > 1 else parts


def check_keys(mapping: Any, allowed: tuple[str, ...], where: str) -> Mapping[str, Any]:
    """``mapping`` if it is a mapping whose keys are all ``allowed``; otherwise one line naming the key."""
    if not isinstance(mapping, dict):
        raise GiftMergeError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            if key == "modules":
                raise GiftMergeError(f"{where}.modules: multi-module (VLM) recipes are not supported yet")
            raise GiftMergeError(f"{where}: unknown key {key!r}{did_you_mean(str(key), allowed)}")
    return mapping


def _parse_parameters(raw: Any, op: Operator, where: str, *, per_model_only: bool) -> dict[str, Setting]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise GiftMergeError(f"{where}: expected a mapping of parameter names to values")
    known = {p.name: p for p in op.params}
    result: dict[str, Setting] = {}
    for name, value in raw.items():
        param = known.get(name)
        if param is None and name in op.ignores:
            log.info("%s.%s: ignored, as mergekit ignores it for %s", where, name, op.name)
            continue
        if param is None:
            hint = did_you_mean(str(name), known) or (f" ({op.name} takes: {', '.join(known)})" if known else "")
            raise GiftMergeError(f"{where}.{name}: unknown parameter for {op.name}{hint}")
        if per_model_only and not param.per_model:
            raise GiftMergeError(
                f"{where}.{name}: {name!r} is one value per tensor for {op.name}; set it under the top-level "
                "or slice 'parameters'"
            )
        result[name] = compile_setting(value, f"{where}.{name}")
    return result


def _parse_model(raw: Any, where: str) -> ModelRef:
    if raw is None:
        raise GiftMergeError(f"{where}: missing")
    return ModelRef.parse(raw, where)


def _parse_layer_range(raw: Any, where: str) -> tuple[int, int]:
    ok = isinstance(raw, list) and len(raw) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in raw)
    if not ok or raw[0] < 0 or raw[1] <= raw[0]:
        raise GiftMergeError(f"{where}: expected [start, end) with 0 <= start < end, got {raw!r}")
    return raw[0], raw[1]


def _parse_stage(doc: Any, where: str, text: str) -> MergeStage:
    doc = check_keys(doc, STAGE_KEYS, where)
    if "merge_method" not in doc:
        raise GiftMergeError(f"{where}: missing 'merge_method'")
    try:
        op = get_operator(str(doc["merge_method"]))
    except GiftMergeError as exc:
        raise GiftMergeError(f"{where}.merge_method: {exc}") from None
    if ("models" in doc) == ("slices" in doc):
        raise GiftMergeError(f"{where}: give exactly one of 'models' or 'slices'")
    models = slices = None
    if "models" in doc:
        if not isinstance(doc["models"], list) or not doc["models"]:
            raise GiftMergeError(f"{where}.models: expected a non-empty list")
        models = tuple(_parse_input(m, op, f"{where}.models[{i}]", MODEL_KEYS) for i, m in enumerate(doc["models"]))
    else:
        if not isinstance(doc["slices"], list) or not doc["slices"]:
            raise GiftMergeError(f"{where}.slices: expected a non-empty list")
        slices = tuple(_parse_slice(s, op, f"{where}.slices[{i}]") for i, s in enumerate(doc["slices"]))
    base = _parse_model(doc["base_model"], f"{where}.base_model") if doc.get("base_model") is not None else None
    for key in ("dtype", "out_dtype"):
        if doc.get(key) is not None:
            parse_dtype(doc[key], f"{where}.{key}")
    name = doc.get("name")
    if name is not None and not isinstance(name, str):
        raise GiftMergeError(f"{where}.name: expected a string")
    return MergeStage(
        merge_method=op.name,
        models=models,
        slices=slices,
        base_model=base,
        parameters=_parse_parameters(doc.get("parameters"), op, f"{where}.parameters", per_model_only=False),
        dtype=doc.get("dtype"),
        out_dtype=doc.get("out_dtype"),
        tokenizer=_parse_tokenizer(doc, base, where),
        chat_template=_parse_chat_template(doc.get("chat_template"), f"{where}.chat_template"),
        name=name,
        output=str(doc["output"]) if doc.get("output") is not None else None,
        text=text,
    )


def _parse_input(raw: Any, op: Operator, where: str, keys: tuple[str, ...]) -> InputModel:
    raw = check_keys(raw, keys, where)
    layer_range = _parse_layer_range(raw["layer_range"], f"{where}.layer_range") if "layer_range" in raw else None
    if "layer_range" in keys and layer_range is None:
        raise GiftMergeError(f"{where}: missing 'layer_range'")
    return InputModel(
        model=_parse_model(raw.get("model"), f"{where}.model"),
        parameters=_parse_parameters(raw.get("parameters"), op, f"{where}.parameters", per_model_only=True),
        layer_range=layer_range,
        where=where,
    )


def _parse_slice(raw: Any, op: Operator, where: str) -> SliceSpec:
    raw = check_keys(raw, SLICE_KEYS, where)
    sources = raw.get("sources")
    if not isinstance(sources, list) or not sources:
        raise GiftMergeError(f"{where}.sources: expected a non-empty list")
    parsed = tuple(_parse_input(s, op, f"{where}.sources[{i}]", SOURCE_KEYS) for i, s in enumerate(sources))
    spans = {s.layer_range[1] - s.layer_range[0] for s in parsed if s.layer_range}
    if len(spans) > 1:
        raise GiftMergeError(
            f"{where}: every source of a slice must span the same number of layers, got {sorted(spans)}"
        )
    base = _parse_model(raw["base_model"], f"{where}.base_model") if raw.get("base_model") is not None else None
    return SliceSpec(
        sources=parsed,
        base_model=base,
        parameters=_parse_parameters(raw.get("parameters"), op, f"{where}.parameters", per_model_only=False),
        where=where,
    )


def _parse_tokenizer(doc: Mapping[str, Any], base: ModelRef | None, where: str) -> TokenizerSpec | None:
    """``tokenizer_source: base | union | <model>`` or ``tokenizer: {source, tokens, pad_to_multiple_of}``."""
    if doc.get("tokenizer_source") is not None and doc.get("tokenizer") is not None:
        raise GiftMergeError(f"{where}: give 'tokenizer_source' or 'tokenizer', not both")
    tokens: dict[str, TokenSpec] = {}
    pad = None
    if doc.get("tokenizer") is not None:
        key = f"{where}.tokenizer"
        cfg = check_keys(doc["tokenizer"], ("source", "tokens", "pad_to_multiple_of"), key)
        raw_source = cfg.get("source", "union")
        if cfg.get("tokens") is not None:
            raw_tokens = cfg["tokens"]
            if not isinstance(raw_tokens, dict):
                raise GiftMergeError(f"{key}.tokens: expected a mapping of tokens to {{source, force}}")
            tokens = {
                _token_key(t, f"{key}.tokens"): _parse_token(v, f"{key}.tokens.{t}") for t, v in raw_tokens.items()
            }
        if cfg.get("pad_to_multiple_of") is not None:
            pad = cfg["pad_to_multiple_of"]
            if isinstance(pad, bool) or not isinstance(pad, int) or pad < 1:
                raise GiftMergeError(f"{key}.pad_to_multiple_of: expected a whole number >= 1, got {pad!r}")
        source_key = f"{key}.source"
    elif doc.get("tokenizer_source") is not None:
        raw_source, source_key = doc["tokenizer_source"], f"{where}.tokenizer_source"
    else:
        return None
    if raw_source in ("union", "base"):
        if raw_source == "base" and base is None:
            raise GiftMergeError(f"{source_key}: 'base' needs a base_model")
        return TokenizerSpec(raw_source, None, tokens, pad)
    return TokenizerSpec("model", _parse_model(raw_source, source_key), tokens, pad)


def _token_key(token: Any, where: str) -> str:
    if not isinstance(token, str) or not token:
        raise GiftMergeError(f"{where}: {token!r} is not a token; quote it to make it a string")
    return token


_TOKEN_KINDS = ("model_token", "zero")


def _parse_token(raw: Any, where: str) -> TokenSpec:
    """One ``tokens`` entry: ``{source: <model> | {kind: model_token, model, token | token_id} | {kind: zero},
    force: bool}``."""
    raw = check_keys({} if raw is None else raw, ("source", "force"), where)
    force = raw.get("force", False)
    if not isinstance(force, bool):
        raise GiftMergeError(f"{where}.force: expected true or false, got {force!r}")
    source = _parse_token_source(raw.get("source"), f"{where}.source")
    if force and source is None:
        raise GiftMergeError(f"{where}.force: forcing a token's rows needs a 'source' to take them from")
    return TokenSpec(source, force)


def _parse_token_source(raw: Any, where: str) -> TokenSource | None:
    if raw is None:
        return None
    if not (isinstance(raw, dict) and "kind" in raw):
        return TokenSource("model", _parse_model(raw, where))
    kind = raw["kind"]
    if kind not in _TOKEN_KINDS:
        hint = did_you_mean(str(kind), _TOKEN_KINDS) or f" (expected {' or '.join(_TOKEN_KINDS)})"
        raise GiftMergeError(f"{where}.kind: unknown kind {kind!r}{hint}")
    if kind == "zero":
        check_keys(raw, ("kind",), where)
        return TokenSource("zero")
    check_keys(raw, ("kind", "model", "token", "token_id"), where)
    model = _parse_model(raw.get("model"), f"{where}.model")
    token, token_id = raw.get("token"), raw.get("token_id")
    if (token is None) == (token_id is None):
        raise GiftMergeError(f"{where}: give exactly one of 'token' and 'token_id'")
    if token is not None and (not isinstance(token, str) or not token):
        raise GiftMergeError(f"{where}.token: expected a token string, got {token!r}")
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        raise GiftMergeError(f"{where}.token_id: expected a row index >= 0, got {token_id!r}")
    return TokenSource("model_token", model, token, token_id)


def _parse_chat_template(raw: Any, where: str) -> str | None:
    from gift_merge.io.chat_templates import BUILTIN_TEMPLATES

    if raw is None:
        return None
    if not isinstance(raw, str):
        raise GiftMergeError(f"{where}: expected a template name or a Jinja string")
    if raw in BUILTIN_TEMPLATES or raw == "auto" or ("{" in raw and len(raw) >= 20):
        return raw
    raise GiftMergeError(
        f"{where}: {raw!r} is neither 'auto', a built-in template ({', '.join(BUILTIN_TEMPLATES)}) nor a Jinja string"
    )


def _order_stages(stages: list[Stage], label: str) -> list[Stage]:
    """Rewrite references to earlier stages and sort the stages so dependencies run first."""
    names = [s.name for s in stages if s.name]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise GiftMergeError(f"{label}: two documents are named {dup!r}")
    if sum(1 for s in stages if not s.name) > 1:
        raise GiftMergeError(f"{label}: only the final document may be unnamed; give the others a 'name'")
    by_name = {s.name: s for s in stages if s.name}

    def link(ref: ModelRef | None) -> ModelRef | None:
        if ref is not None and ref.path in by_name and ref.revision is None:
            return ModelRef(ref.path, None, ref.adapter, ref.adapter_revision, stage=ref.path)
        return ref

    linked: dict[str, Stage] = {}
    for stage in stages:
        linked[stage.name or ""] = _relink(stage, link)
    deps = {key: stage_dependencies(s) for key, s in linked.items()}
    order: list[str] = []
    visiting: set[str] = set()

    def visit(key: str) -> None:
        if key in order:
            return
        if key in visiting:
            raise GiftMergeError(f"{label}: documents refer to each other in a cycle through {key!r}")
        visiting.add(key)
        for dep in sorted(deps[key]):
            visit(dep)
        visiting.discard(key)
        order.append(key)

    final = next((s.name or "" for s in stages if not s.name), stages[-1].name or "")
    for key in [*linked.keys()]:
        if key != final:
            visit(key)
    visit(final)
    return [linked[k] for k in order]


def stage_dependencies(stage: Stage) -> set[str]:
    """Names of the earlier stages whose outputs ``stage`` reads."""
    return {r.stage for r in stage_references(stage) if r.stage}


def stage_references(stage: Stage) -> list[ModelRef]:
    """Every model reference the stage reads: models, bases, tokenizer source, slices' sources."""
    if isinstance(stage, TrainStage):
        return [r for r in (stage.base, stage.instruct) if r is not None]
    refs = [stage.base_model, *(stage.tokenizer.references() if stage.tokenizer else ())]
    refs += [m.model for m in stage.models or ()]
    for sl in stage.slices or ():
        refs += [sl.base_model, *(s.model for s in sl.sources)]
    return [r for r in refs if r is not None]


def _relink(stage: Stage, link: Any) -> Stage:
    from dataclasses import replace

    if isinstance(stage, TrainStage):
        return replace(stage, base=link(stage.base), instruct=link(stage.instruct))

    def relink_input(m: InputModel) -> InputModel:
        return replace(m, model=link(m.model))

    return replace(
        stage,
        base_model=link(stage.base_model),
        tokenizer=_relink_tokenizer(stage.tokenizer, link),
        models=tuple(relink_input(m) for m in stage.models) if stage.models else None,
        slices=tuple(
            replace(sl, base_model=link(sl.base_model), sources=tuple(relink_input(s) for s in sl.sources))
            for sl in stage.slices
        )
        if stage.slices
        else None,
    )


def _relink_tokenizer(spec: TokenizerSpec | None, link: Any) -> TokenizerSpec | None:
    from dataclasses import replace

    if spec is None:
        return None
    tokens = {
        token: replace(t, source=replace(t.source, model=link(t.source.model))) if t.source is not None else t
        for token, t in spec.tokens.items()
    }
    return replace(spec, model=link(spec.model), tokens=tokens)
