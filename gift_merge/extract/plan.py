"""Decide, from the checkpoint headers alone, what becomes of every tensor before any is read.

Each tensor of the tuned model ends up in exactly one place: a LoRA job (a weight matrix factored into
A and B, its bias possibly riding along as ``lora_B.bias``), a save job (copied whole into
``modules_to_save``), or the dropped list (reported, with the size of what is lost). Mismatched
checkpoints, bad options and patterns that match nothing fail here, so a long extraction never dies
halfway on a typo.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from gift_merge.architecture import detect_layout, is_pre_weight
from gift_merge.errors import GiftMergeError
from gift_merge.extract.modules import ModelModules, describe_modules
from gift_merge.extract.options import ExtractOptions
from gift_merge.inputs import read_config
from gift_merge.io.adapter import PREFIX
from gift_merge.io.reader import CheckpointReader

Layout = Literal["linear", "conv1d", "embedding"]


@dataclass(frozen=True)
class LoraJob:
    """One weight matrix to factor. ``layout`` says how the stored tensor maps to peft's [out, in]:
    Linear stores [out, in]; Conv1D stores [in, out] and Embedding [vocab, dim], both transposed."""

    module: str
    weight: str  # checkpoint tensor name, the same in both models
    bias: str | None  # checkpoint bias tensor written as lora_B.bias (only when the plan uses lora_bias)
    layout: Layout
    max_rank: int
    rank_source: str | None  # the --rank-pattern regex that set max_rank; None for --rank


@dataclass(frozen=True)
class SaveJob:
    """Tensors copied whole from the tuned model into ``modules_to_save``."""

    modules: tuple[str, ...]  # what modules_to_save lists (two for a tied embedding: input and head)
    tensors: tuple[tuple[str, str], ...]  # (checkpoint tensor, adapter tensor name)
    reason: str
    tied: bool = False  # an embedding saved with its tied head: peft must re-tie them (ensure_weight_tying)


@dataclass(frozen=True)
class Dropped:
    """A tensor that is not in the adapter. With ``measure`` both versions are read to report the loss."""

    tensor: str
    reason: str
    measure: bool


@dataclass(frozen=True)
class ExtractPlan:
    lora: tuple[LoraJob, ...]
    save: tuple[SaveJob, ...]
    dropped: tuple[Dropped, ...]
    lora_bias: bool
    modules: ModelModules

    @property
    def fan_in_fan_out(self) -> bool:
        return any(job.layout == "conv1d" for job in self.lora)

    @property
    def steps(self) -> int:
        """Progress-bar length: every job plus every dropped tensor that is measured."""
        return len(self.lora) + len(self.save) + sum(d.measure for d in self.dropped)


def plan_extraction(base: CheckpointReader, tuned: CheckpointReader, options: ExtractOptions) -> ExtractPlan:
    """The full plan, or a one-line error naming the tensor, module or option at fault.

    ``options`` must already be checked (:meth:`ExtractOptions.check`): :func:`extract_lora` does that
    first, so a bad option fails before any model is located or downloaded.
    """
    _check_same_tensors(base, tuned)
    shapes = {name: tuned.info(name).shape for name in tuned.names}
    layout = detect_layout(shapes, read_config(tuned.folder, strict=False), str(tuned.folder))
    modules = describe_modules(tuned.folder, shapes)

    groups: dict[str, dict[str, str]] = {}  # module → param → checkpoint tensor
    dropped: list[Dropped] = []

    def order(name: str) -> tuple[int, int, str]:
        split = layout.split(name)
        if split is not None:
            return 1, split[0], split[1]
        return (0 if is_pre_weight(name) else 2), 0, name

    for name in sorted(shapes, key=order):
        owner = modules.module_of(name)
        if owner is None:
            dropped.append(Dropped(name, "not a parameter of the transformers model", measure=True))
        else:
            groups.setdefault(owner[0], {})[owner[1]] = name

    lora: list[LoraJob] = []
    save: list[SaveJob] = []
    for module, params in groups.items():
        kind = modules.kinds.get(module, "other")
        weight = params.get("weight")
        if options.excluded(module):
            dropped += [Dropped(t, "excluded by --exclude", measure=False) for t in params.values()]
            continue
        matrix = weight is not None and len(shapes[weight]) == 2 and kind != "other"
        vocab = kind == "embedding" or module == modules.head
        if matrix and vocab and options.embeddings != "lora":
            if options.embeddings == "skip":
                dropped += [Dropped(t, "embedding or head (--embeddings skip)", measure=True) for t in params.values()]
                continue
            job = SaveJob((module,), tuple((t, f"{PREFIX}{module}.{p}") for p, t in params.items()), "embeddings")
            if module == modules.input_embedding and modules.tied_head and modules.head and weight is not None:
                # The head shares this weight: save it under the head's name too and ask peft to keep the
                # two tied, or merge_and_unload leaves the head with the base model's embedding.
                head = modules.head
                job = SaveJob((module, head), (*job.tensors, (weight, f"{PREFIX}{head}.weight")), job.reason, True)
            save.append(job)
            continue
        chosen = vocab or options.included(module, default=layout.split(weight or "") is not None)
        if matrix and chosen:
            assert weight is not None
            max_rank, source = options.pattern_rank(module)
            layout_kind: Layout = "embedding" if kind == "embedding" else "conv1d" if kind == "conv1d" else "linear"
            lora.append(LoraJob(module, weight, params.get("bias"), layout_kind, max_rank, source))
            extra = {p: t for p, t in params.items() if p not in ("weight", "bias")}
            dropped += [Dropped(t, "parameter LoRA cannot express", measure=True) for t in extra.values()]
        elif matrix:
            why = "not chosen by --include" if options.include else "outside the transformer layers (see --include)"
            dropped += [Dropped(t, why, measure=False) for t in params.values()]
        elif options.save_undecomposable:
            save.append(SaveJob((module,), tuple((t, f"{PREFIX}{module}.{p}") for p, t in params.items()), "vector"))
        else:
            reason = "not a LoRA-able matrix (keep it with --save-undecomposable)"
            dropped += [Dropped(t, reason, measure=True) for t in params.values()]

    _check_selection(options, lora, list(groups))
    lora, bias_dropped, lora_bias = _place_biases(lora, options)
    return ExtractPlan(tuple(lora), tuple(save), tuple(dropped + bias_dropped), lora_bias, modules)


def _check_same_tensors(base: CheckpointReader, tuned: CheckpointReader) -> None:
    base_names, tuned_names = set(base.names), set(tuned.names)
    for missing, have, lack in ((tuned_names - base_names, tuned, base), (base_names - tuned_names, base, tuned)):
        if missing:
            name = sorted(missing)[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise GiftMergeError(f"tensor {name}: in {have.folder} but missing from {lack.folder}{more}")
    for name in tuned.names:
        b, t = base.info(name).shape, tuned.info(name).shape
        if b != t:
            hint = " (vocabularies differ: resize the base model's embeddings first)" if len(b) == 2 else ""
            raise GiftMergeError(f"tensor {name}: shape {list(t)} in {tuned.folder} but {list(b)} in base{hint}")


def _check_selection(options: ExtractOptions, lora: Sequence[LoraJob], modules: Sequence[str]) -> None:
    """Every regex must do something, so a typo fails instead of silently extracting the wrong thing."""
    example = lora[0].module if lora else (modules[0] if modules else "?")
    for regex in options.include:
        if not any(re.search(regex, job.module) for job in lora):
            raise GiftMergeError(f"--include {regex}: matches no Linear module (names look like {example})")
    for regex in options.exclude:
        if not any(re.search(regex, m) for m in modules):
            raise GiftMergeError(f"--exclude {regex}: matches no module (names look like {example})")
    for regex, rank in options.rank_pattern:
        if not any(job.rank_source == regex for job in lora):
            raise GiftMergeError(
                f"--rank-pattern {regex}={rank}: sets the rank of no LoRA module (names look like {example})"
            )
    if not lora:
        raise GiftMergeError("no module selected for LoRA extraction (check --include / --exclude)")


def _place_biases(lora: list[LoraJob], options: ExtractOptions) -> tuple[list[LoraJob], list[Dropped], bool]:
    """Biases of LoRA targets go in ``lora_B.bias`` when peft can merge them, else they are dropped.

    peft's ``lora_bias`` is one switch for the whole adapter: merging fails on any target without a
    bias, and embedding LoRA refuses it. So it is used only when every target has a bias (GPT-2), and
    only with --save-undecomposable; otherwise the bias deltas are measured and reported as dropped.
    """
    with_bias = [job for job in lora if job.bias is not None]
    if not with_bias:
        return lora, [], False
    unbiased = [job.module for job in lora if job.bias is None]
    embedding = any(job.layout == "embedding" for job in lora)
    if options.save_undecomposable and not unbiased and not embedding:
        return lora, [], True
    if not options.save_undecomposable:
        reason = "bias of a LoRA target (keep it with --save-undecomposable)"
    elif embedding:
        reason = "bias of a LoRA target: peft's lora_bias cannot go with embedding LoRA (try --embeddings save)"
    else:
        reason = f"bias of a LoRA target: peft's lora_bias needs every target to have one ({unbiased[0]} has none)"
    dropped = [Dropped(job.bias, reason, measure=True) for job in with_bias if job.bias is not None]
    return [replace(job, bias=None) for job in lora], dropped, False
