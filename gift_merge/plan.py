"""Recipe stage → the list of output tensors, each with its inputs, operator and resolved parameters.

Pure and printable: everything that can be wrong with a recipe (a missing tensor, a shape mismatch, a
parameter out of range, a missing weight) fails here, before any tensor is read. ``execute`` then only
reads, computes and writes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from gift_merge.architecture import is_pre_weight, is_vocab_tensor
from gift_merge.dtypes import FLOAT32, FLOAT64, DType, dtype_name, parse_dtype
from gift_merge.errors import GiftMergeError
from gift_merge.inputs import ModelInfo, ModelResolver, require_output_config
from gift_merge.operators import get_operator
from gift_merge.operators.base import Operator, Param
from gift_merge.recipe.schema import InputModel, MergeStage, ModelRef
from gift_merge.recipe.settings import Setting

if TYPE_CHECKING:
    from gift_merge.vocab import MergedVocabulary, RowMap


@dataclass(frozen=True)
class TensorSource:
    model: str  # a key of MergePlan.models
    name: str
    delta: bool = False  # load the adapter's change to this tensor rather than the patched tensor


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: ``operator(base, inputs)`` with everything already resolved."""

    name: str
    operator: str
    inputs: tuple[TensorSource, ...]
    base: TensorSource | None
    model_params: tuple[Mapping[str, Any], ...]
    params: Mapping[str, Any]
    shape: tuple[int, ...]
    out_dtype: DType
    load_dtype: DType | None = None  # the recipe's `dtype`: inputs are rounded to it on load
    rows: int | None = None  # vocab tensors: use the first `rows` rows of every input
    copy: bool = False  # non-float tensors (buffers) are copied from the first input unchanged
    math_dtype: DType = FLOAT32
    row_map: RowMap | None = None  # vocabulary tensors: each input re-indexed to the merged vocabulary

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.out_dtype.itemsize

    @property
    def sources(self) -> tuple[TensorSource, ...]:
        """Every tensor the job reads: its inputs and, if any, its base."""
        return (*self.inputs, self.base) if self.base is not None else self.inputs


@dataclass
class MergePlan:
    stage: MergeStage
    operator: Operator
    jobs: list[TensorJob]
    models: dict[str, ModelInfo]
    reference: str
    tokenizer_model: str
    config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    vocabulary: MergedVocabulary | None = None  # a merged tokenizer (``tokenizer_source`` / ``tokenizer:``)

    @property
    def output_bytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)


@dataclass(frozen=True)
class _Source:
    label: str
    start: int
    params: Mapping[str, Setting]
    is_base: bool


@dataclass(frozen=True)
class _Slice:
    sources: tuple[_Source, ...]
    length: int
    params: Mapping[str, Setting]
    where: str

    @property
    def primary(self) -> _Source:
        return next((s for s in self.sources if s.is_base), self.sources[0])


def plan_stage(stage: MergeStage, resolver: ModelResolver) -> MergePlan:
    op = get_operator(stage.merge_method)
    models: dict[str, ModelInfo] = {}

    def info(ref: ModelRef, receiver: ModelInfo | None = None) -> ModelInfo:
        model = resolver.resolve(ref, receiver)
        models[model.label] = model
        return model

    if op.base == "required" and stage.base_model is None and not any(sl.base_model for sl in stage.slices or ()):
        raise GiftMergeError(f"merge_method {op.name} needs a base_model")
    base_label = info(stage.base_model).label if stage.base_model else None
    slices = _normalise_slices(stage, op, info, base_label)
    reference = base_label or slices[0].primary.label
    require_output_config(models[reference], from_base=base_label is not None)
    planner = _Planner(stage, op, models, slices)
    jobs = planner.jobs()
    merged = None
    if stage.tokenizer is not None:
        jobs, merged = _merge_vocabulary(stage, models, slices, jobs, info, base_label, reference, planner.warnings)
    tokenizer = merged.home if merged is not None else reference
    config = _output_config(models, reference, slices, jobs)
    if merged is not None:
        from gift_merge.vocab import set_vocab_size

        set_vocab_size(config, merged.rows)
    warnings = [*resolver.warnings, *planner.warnings]
    return MergePlan(stage, op, jobs, models, reference, tokenizer, config, warnings, merged)


def _merge_vocabulary(
    stage: MergeStage, models: dict[str, ModelInfo], slices: list[_Slice], jobs: list[TensorJob], info: Any,
    base: str | None, reference: str, warnings: list[str],
) -> tuple[list[TensorJob], MergedVocabulary]:  # fmt: skip
    """The merged vocabulary (:mod:`gift_merge.vocab`) and the jobs with their vocabulary tensors re-indexed.
    The base tokenizer is the base model's, else the reference model's (mergekit takes an arbitrary model)."""
    from gift_merge.vocab import plan_vocabulary, remap_jobs

    spec = stage.tokenizer
    assert spec is not None
    home = info(spec.model).label if spec.model is not None else base or reference
    inputs = [s.label for sl in slices for s in sl.sources]
    for token, entry in spec.tokens.items():
        model = entry.source.model if entry.source is not None else None
        if model is not None and str(model) not in inputs:
            raise GiftMergeError(f"tokenizer.tokens.{token}.source: {model} is not one of the merge's models")
    merged, found = plan_vocabulary(spec, models, inputs, base or reference, home)
    warnings += found

    def base_of(job: TensorJob) -> str | None:  # a listed base counts for methods that ignore it, as in mergekit
        labels = [s.model for s in job.sources]
        return job.base.model if job.base is not None else (base if base in labels else None)

    remapped = remap_jobs(jobs, merged, models, base_of, str, warnings)
    return remapped, merged


def _normalise_slices(stage: MergeStage, op: Operator, info: Any, base_label: str | None) -> list[_Slice]:
    """``models:`` becomes one slice over all layers; the base joins as an input where the method uses it."""
    specs: list[tuple[list[InputModel], ModelRef | None, Mapping[str, Setting], str]] = []
    if stage.models is not None:
        specs.append((list(stage.models), stage.base_model, {}, "models"))
    else:
        for sl in stage.slices or ():
            specs.append((list(sl.sources), sl.base_model or stage.base_model, sl.parameters, sl.where))
    result = []
    for inputs, base_ref, params, where in specs:
        receiver = info(base_ref) if base_ref else None
        slice_base = receiver.label if receiver else None
        sources, lengths = [], set()
        for entry in inputs:
            model = info(entry.model, receiver)
            if op.deltas and not model.is_adapter:
                raise GiftMergeError(f"{entry.where}.model: {op.name} takes adapter folders, {model.label} is a model")
            start, end = entry.layer_range or (0, model.layout.num_layers)
            if end > model.layout.num_layers:
                raise GiftMergeError(
                    f"{entry.where}.layer_range: {model.label} has {model.layout.num_layers} layers, "
                    f"asked for [{start}, {end})"
                )
            lengths.add(end - start)
            is_base = op.base != "ignored" and model.label == slice_base
            sources.append(_Source(model.label, start, entry.parameters, is_base))
        if len(lengths) > 1:
            raise GiftMergeError(f"{where}: inputs have different layer counts {sorted(lengths)}; use slices")
        length = lengths.pop()
        if op.base != "ignored" and slice_base and not any(s.is_base for s in sources):
            start = sources[0].start if stage.slices is not None else 0
            sources.append(_Source(slice_base, start, {}, True))
        if op.base == "required" and not any(s.is_base for s in sources):
            raise GiftMergeError(f"{where}: merge_method {op.name} needs a base_model")
        n_inputs = sum(1 for s in sources if not s.is_base)
        if n_inputs < op.min_models or (op.max_models is not None and n_inputs > op.max_models):
            bound = (
                f"{op.min_models}" if op.max_models == op.min_models else f"{op.min_models}..{op.max_models or 'any'}"
            )
            raise GiftMergeError(f"{where}: {op.name} takes {bound} input model(s) besides the base, got {n_inputs}")
        result.append(_Slice(tuple(sources), length, params, where))
    return result


class _Planner:
    def __init__(self, stage: MergeStage, op: Operator, models: dict[str, ModelInfo], slices: list[_Slice]):
        self.stage, self.op, self.models, self.slices = stage, op, models, slices
        self.load_dtype = parse_dtype(stage.dtype, "dtype") if stage.dtype else None
        self.out_dtype = parse_dtype(stage.out_dtype, "out_dtype") if stage.out_dtype else self.load_dtype
        self.warnings: list[str] = []

    def jobs(self) -> list[TensorJob]:
        first, last = self.slices[0], self.slices[-1]
        jobs = [self._job(name, first, {s.label: name for s in first.sources}, 0.0)
                for name in self._loose_names(first) if is_pre_weight(name)]  # fmt: skip
        offset = 0
        for sl in self.slices:
            primary = self.models[sl.primary.label]
            out_layout = self.models[self.slices[0].primary.label].layout
            for k in range(sl.length):
                t = k / (sl.length - 1) if sl.length > 1 else 1.0
                for suffix in self._layer_suffixes(primary, sl.primary.start + k):
                    sources = {s.label: self.models[s.label].layout.name(s.start + k, suffix) for s in sl.sources}
                    jobs.append(self._job(out_layout.name(offset + k, suffix), sl, sources, t))
            offset += sl.length
        jobs += [self._job(name, last, {s.label: name for s in last.sources}, 0.0)
                 for name in self._loose_names(last) if not is_pre_weight(name)]  # fmt: skip
        return jobs

    def _loose_names(self, sl: _Slice) -> list[str]:
        model = self.models[sl.primary.label]
        return [n for n in model.tensors if model.layout.split(n) is None]

    @staticmethod
    def _layer_suffixes(model: ModelInfo, index: int) -> list[str]:
        result = []
        for name in model.tensors:
            split = model.layout.split(name)
            if split and split[0] == index:
                result.append(split[1])
        return result

    def _resolve_name(self, label: str, name: str, out_name: str) -> str:
        """The input's own tensor for ``name``; a tied model's lm_head is its input embedding."""
        model = self.models[label]
        if model.has(name):
            return name
        if name.endswith("lm_head.weight"):
            tied = [n for n in model.tensors if is_pre_weight(n) and is_vocab_tensor(n)]
            if len(tied) == 1:
                return tied[0]
        raise GiftMergeError(f"tensor {out_name}: model {label} has no tensor {name}")

    def _job(self, out_name: str, sl: _Slice, names: Mapping[str, str], t: float) -> TensorJob:
        op = self.op
        sources = {s.label: TensorSource(s.label, self._resolve_name(s.label, names[s.label], out_name))
                   for s in sl.sources}  # fmt: skip
        base = next((sources[s.label] for s in sl.sources if s.is_base), None)
        inputs = [s for s in sl.sources if not s.is_base]
        if op.deltas:  # an adapter that leaves this tensor alone adds nothing to it
            inputs = [s for s in inputs if sources[s.label].name in self.models[s.label].patches]
            sources.update({s.label: replace(sources[s.label], delta=True) for s in inputs})
        primary = sources[sl.primary.label]
        shape, stored = self.models[primary.model].tensors[primary.name]
        rows = self._check_shapes(out_name, [sources[s.label] for s in sl.sources], shape)
        out_dtype = self.out_dtype or stored
        if not (stored.is_floating_point and out_dtype.is_floating_point):
            return TensorJob(out_name, "copy", (primary,), None, ({},), {}, shape, stored, copy=True)
        params = {p.name: self._value(p, out_name, t, [sl.params, self.stage.parameters], None)
                  for p in op.global_params}  # fmt: skip
        model_params = tuple(
            {p.name: self._value(p, out_name, t, [s.params, sl.params, self.stage.parameters], s.label)
             for p in op.model_params}
            for s in inputs
        )  # fmt: skip
        if op.check is not None:
            problem = op.check(params, model_params)
            if problem:
                raise GiftMergeError(f"tensor {out_name}: {problem}")
        # fp64 where an input is a patched model, so operators can recover the adapter's delta exactly
        patched = any(not src.delta and src.name in self.models[src.model].patches for src in sources.values())
        return TensorJob(
            name=out_name,
            operator=op.name,
            inputs=tuple(sources[s.label] for s in inputs),
            base=base,
            model_params=model_params,
            params=params,
            shape=shape,
            out_dtype=out_dtype,
            load_dtype=self.load_dtype,
            rows=rows,
            math_dtype=FLOAT64 if patched else FLOAT32,
        )

    def _value(
        self, param: Param, tensor: str, t: float, levels: list[Mapping[str, Setting]], model: str | None
    ) -> Any:
        raw = None
        for level in levels:
            if param.name in level:
                raw = level[param.name].evaluate(tensor, t)
                if raw is not None:
                    break
        if raw is None:
            if param.required:
                who = f" for model {model}" if model else ""
                raise GiftMergeError(f"tensor {tensor}: parameter {param.name!r} is required{who} but not set")
            return param.default
        value = _coerce(raw, param, tensor)
        if param.check is not None:
            problem = param.check(value)
            if problem:
                who = f", model {model}" if model else ""
                raise GiftMergeError(f"tensor {tensor}{who}: {problem}")
        return value

    def _check_shapes(self, out_name: str, sources: list[TensorSource], shape: tuple[int, ...]) -> int | None:
        rows = None
        for src in sources:
            other, _ = self.models[src.model].tensors[src.name]
            if other == shape:
                continue
            same_cols = len(other) == len(shape) and other[1:] == shape[1:]
            if is_vocab_tensor(out_name) and same_cols and self.stage.tokenizer is not None:
                continue  # re-indexed to the merged vocabulary (:mod:`gift_merge.vocab`)
            if is_vocab_tensor(out_name) and same_cols and other[0] > shape[0]:
                rows = shape[0]
                self.warnings.append(
                    f"tensor {out_name}: {src.model} has {other[0]} rows; using the first {shape[0]} as the output has"
                )
                continue
            raise GiftMergeError(f"tensor {out_name}: {src.model} has shape {list(other)}, expected {list(shape)}")
        return rows


def _coerce(raw: Any, param: Param, tensor: str) -> Any:
    kind = param.kind
    if kind is bool:
        if not isinstance(raw, bool):
            raise GiftMergeError(f"tensor {tensor}: parameter {param.name!r} must be true or false, got {raw!r}")
        return raw
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise GiftMergeError(f"tensor {tensor}: parameter {param.name!r} must be a number, got {raw!r}")
    if kind is int:
        if float(raw) != int(raw):
            raise GiftMergeError(f"tensor {tensor}: parameter {param.name!r} must be a whole number, got {raw!r}")
        return int(raw)
    return float(raw)


def _output_config(
    models: Mapping[str, ModelInfo],
    reference: str,
    slices: list[_Slice],
    jobs: list[TensorJob],
) -> dict[str, Any]:
    """The reference model's config with the layer count and every per-layer list rebuilt for slices.

    mergekit updates only the count and leaves lists such as Qwen2's ``layer_types`` stale, which breaks
    frankenmerges on load; here each output layer takes its entry from the model and layer it came from.
    """
    ref = models[reference]
    config = copy.deepcopy(ref.config)
    origins: list[tuple[str, int]] = []
    for sl in slices:
        origins += [(sl.primary.label, sl.primary.start + k) for k in range(sl.length)]
    key = ref.layout.count_key
    if key is not None:
        old = config[key]
        config[key] = len(origins)
        for name, value in ref.config.items():
            if isinstance(value, list) and len(value) == old and old > 0 and name != key:
                rebuilt = []
                for label, index in origins:
                    source_list = models[label].config.get(name)
                    if not isinstance(source_list, list) or index >= len(source_list):
                        raise GiftMergeError(f"config.json of {label}: per-layer list {name!r} is missing or short")
                    rebuilt.append(source_list[index])
                config[name] = rebuilt
    float_dtypes = {j.out_dtype for j in jobs if not j.copy}
    if len(float_dtypes) == 1:
        name = dtype_name(float_dtypes.pop())
        for dtype_key in ("torch_dtype", "dtype"):
            if dtype_key in config:
                config[dtype_key] = name
    return config


def describe_job(job: TensorJob) -> str:
    """One line per job for ``gift-merge plan``."""
    shape = "x".join(str(d) for d in job.shape) or "scalar"
    if job.copy:
        return f"{job.name}  copy  {job.inputs[0].model}  [{shape}] {dtype_name(job.out_dtype)}"
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in job.params.items())
    parts = [f"{job.name}  {job.operator}"]
    if job.base:
        parts.append(f"base={job.base.model}")
    for src, mp in zip(job.inputs, job.model_params, strict=True):
        inner = ", ".join(f"{k}={_fmt(v)}" for k, v in mp.items())
        renamed = f":{src.name}" if src.name != job.name else ""
        parts.append(f"{src.model}{renamed}({inner})" if inner else f"{src.model}{renamed}")
    if params:
        parts.append(f"[{params}]")
    if job.row_map is not None:
        parts.append("[rows re-indexed to the merged vocabulary]")
    parts.append(f"[{shape}] {dtype_name(job.out_dtype)}")
    return "  ".join(parts)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
