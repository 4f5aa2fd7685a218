"""The merged vocabulary, and where every row of each input's re-indexed embedding comes from.

mergekit's ``tokenizer_source`` / ``tokenizer:`` merge, planned from the tokenizers alone (no weight is
read). The output vocabulary is the base model's tokenizer cut to its ``vocab_size`` (``base``), the
same followed by every other model's tokens it lacks (``union``: plain tokens, model by model, then added
tokens, the first definition of each winning), or a named model's tokenizer; tokens named under
``tokenizer.tokens`` join it when missing. Each model's permutation maps a new id to its old id (−1 where
the model lacks the token or its id is past the model's ``vocab_size``).

Every vocabulary tensor (embeddings, LM head) then gets a :class:`RowMap` per job: each input is
re-indexed to the new vocabulary before the merge method runs, so methods see ordinary tensors. A row an
input lacks (or every input's row, for a ``force``d token) is filled by the first rule that applies:

1. the token's ``tokens`` entry: a model's row for it, a model's row for another token, or zeros (an entry
   without a ``source`` only adds the token, and the rules below fill it; mergekit fails there);
2. only one input has the token: that input's row;
3. no input has it: zeros;
4. the base model has it: the base's row;
5. otherwise the mean of the inputs that have it.

Rows past the vocabulary (``pad_to_multiple_of``, or a model's padded embedding) are the input's own row
there when the input has one that no token of its own uses, else the mean of its re-indexed token rows.
Unlike mergekit, the output keeps the padded row count of the model whose tokenizer it starts from (a
Qwen2.5 merge stays at 152064 rows rather than shrinking to its 151665 tokens): rows are
``max(tokens rounded up to pad_to_multiple_of, that model's embedding rows)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from gift_merge.architecture import is_pre_weight, is_vocab_tensor
from gift_merge.errors import GiftMergeError
from gift_merge.inputs import ModelInfo
from gift_merge.io.tokenizer_files import TokenizerVocab, read_vocabulary
from gift_merge.recipe.schema import TokenizerSpec, TokenSpec

OWN_FILL = -1
"""``RowMap.own``: the row is the token's fill (``fill_from``/``fill_row``)."""
OWN_PAD_MEAN = -2
"""``RowMap.own``: a padding row, the mean of the input's re-indexed token rows."""
FILL_ZERO = -1
"""``RowMap.fill_from``: zeros."""
FILL_MEAN = -2
"""``RowMap.fill_from``: the mean of the rows of the inputs that have the token, in input order."""


@dataclass(frozen=True, eq=False)
class RowMap:
    """Where each row of one vocabulary tensor's re-indexed inputs comes from (arrays of ``rows`` ints).

    ``own[k][t]`` for input ``k`` (the job's ``sources`` order): its own row, :data:`OWN_FILL` or
    :data:`OWN_PAD_MEAN`. A fill, the same for every input that takes it, is row ``fill_row[t]`` of input
    ``fill_from[t]``, or :data:`FILL_ZERO` / :data:`FILL_MEAN`. ``is_token[t]``: a token's row (padding
    means average these)."""

    rows: int
    own: tuple[np.ndarray, ...]
    fill_from: np.ndarray
    fill_row: np.ndarray
    is_token: np.ndarray


@dataclass(frozen=True, eq=False)
class MergedVocabulary:
    """The output vocabulary and how to write its tokenizer: ``home``'s tokenizer (the model the output's
    tokenizer files come from) cut at ``limit``, plus ``additions`` in order (content, and the properties of
    an added token, or ``None`` for a plain one)."""

    spec: TokenizerSpec
    home: str
    ids: Mapping[str, int]
    limit: int | None
    additions: tuple[tuple[str, Mapping[str, Any] | None], ...]
    rows: int
    vocabulary: TokenizerVocab
    permutations: Mapping[str, np.ndarray] = field(default_factory=dict)
    vocabs: Mapping[str, TokenizerVocab] = field(default_factory=dict)

    @property
    def rebuild(self) -> bool:
        """Whether the output's tokenizer differs from ``home``'s files (so is written, not copied)."""
        return self.limit is not None or bool(self.additions)


def round_up(count: int, multiple: int | None) -> int:
    return count if not multiple else -(-count // multiple) * multiple


def config_vocab_size(config: Mapping[str, Any]) -> int | None:
    value = config.get("vocab_size")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = config.get("text_config")
    return config_vocab_size(text) if isinstance(text, Mapping) else None


def set_vocab_size(config: dict[str, Any], rows: int) -> None:
    """The output config's vocabulary size, where the config keeps it (top level, or a ``text_config``)."""
    text = config.get("text_config")
    if "vocab_size" not in config and isinstance(text, dict) and "vocab_size" in text:
        text["vocab_size"] = rows
    else:
        config["vocab_size"] = rows


def embedding_rows(model: ModelInfo) -> int | None:
    """Rows of the model's input embedding (its padded vocabulary), from its header."""
    for name, (shape, _) in model.tensors.items():
        if shape and is_pre_weight(name) and is_vocab_tensor(name):
            return shape[0]
    return None


class _Vocabularies:
    """Each model's tokenizer vocabulary, read once per folder."""

    def __init__(self) -> None:
        self._cache: dict[Any, TokenizerVocab | None] = {}

    def of(self, model: ModelInfo) -> TokenizerVocab | None:
        planned = model.tokenizer
        if isinstance(planned, TokenizerVocab):
            return planned
        if isinstance(planned, ModelInfo):
            return self.of(planned)
        if model.folder not in self._cache:
            self._cache[model.folder] = read_vocabulary(model.folder)
        return self._cache[model.folder]


def _cut(vocab: TokenizerVocab, limit: int) -> TokenizerVocab:
    """``vocab`` without ids ``limit`` and up (mergekit cuts the base tokenizer to its ``vocab_size``)."""
    if vocab.size <= limit:
        return vocab
    ids = {t: i for t, i in vocab.ids.items() if i < limit}
    added = {t: p for t, p in vocab.added.items() if t in ids}
    return TokenizerVocab(ids, added, min(vocab.model_size, limit))  # the model's own ids run from 0


class _Growing:
    """A vocabulary that tokens join as the tokenizers library numbers added tokens: an existing token keeps
    its id; a new one gets one past the largest added id, or the model's own size if that is larger."""

    def __init__(self, start: TokenizerVocab) -> None:
        self.ids = dict(start.ids)
        self.added = dict(start.added)
        self.model_size = start.model_size
        self.additions: list[tuple[str, Mapping[str, Any] | None]] = []
        self._next = max([self.model_size, *(self.ids[t] + 1 for t in self.added)])

    def add(self, token: str, props: Mapping[str, Any] | None) -> None:
        self.additions.append((token, props))
        if token not in self.ids:
            self.ids[token] = self._next
            self._next += 1
        if token not in self.added:
            self.added[token] = props or {"single_word": False, "lstrip": False, "rstrip": False,
                                          "normalized": True, "special": False}  # fmt: skip

    def vocabulary(self) -> TokenizerVocab:
        added = dict(sorted(self.added.items(), key=lambda kv: self.ids[kv[0]]))
        return TokenizerVocab(self.ids, added, self.model_size)


def plan_vocabulary(
    spec: TokenizerSpec,
    models: Mapping[str, ModelInfo],
    inputs: Sequence[str],
    base: str,
    home: str,
    where: str = "tokenizer",
) -> tuple[MergedVocabulary, list[str]]:
    """The merged vocabulary of ``inputs`` (model labels, recipe order) with ``base`` (the base model, or
    the first model) and ``home`` (whose tokenizer files the output starts from), and its warnings."""
    vocabs = _Vocabularies()
    warnings: list[str] = []

    def limit_of(label: str, vocab: TokenizerVocab) -> int:
        return config_vocab_size(models[label].config) or len(vocab.ids)

    raw_base = vocabs.of(models[base])
    if raw_base is None:
        raise GiftMergeError(f"{where}: base model {base} has no tokenizer files to merge vocabularies from")
    base_limit = limit_of(base, raw_base)
    base_vocab = _cut(raw_base, base_limit)
    per_model: dict[str, TokenizerVocab] = {base: base_vocab}
    for label in inputs:
        if label in per_model:
            continue
        vocab = vocabs.of(models[label])
        if vocab is None:
            warnings.append(f"{where}: {label} has no tokenizer files; its vocabulary is taken to be {base}'s")
            vocab = base_vocab
        per_model[label] = vocab
    if spec.source == "model":
        start = vocabs.of(models[home])
        if start is None:
            raise GiftMergeError(f"{where}.source: {home} has no tokenizer files")
        limit = None
    else:
        start, limit = base_vocab, (base_limit if raw_base.size > base_limit else None)
    growing = _Growing(start)
    if spec.source == "union":
        others = [(label, per_model[label], limit_of(label, per_model[label])) for label in per_model if label != base]
        _union(growing, base_vocab, others, warnings, where)
    for token in spec.tokens:
        if token not in growing.ids:
            growing.add(token, None)
    ids = growing.ids
    permutations = {label: _permutation(ids, vocab, limit_of(label, vocab)) for label, vocab in per_model.items()}
    size = max(ids.values(), default=-1) + 1
    rows = max(round_up(size, spec.pad_to_multiple_of), embedding_rows(models[home]) or 0)
    merged = MergedVocabulary(
        spec, home, ids, limit, tuple(growing.additions), rows, growing.vocabulary(), permutations, per_model
    )
    return merged, warnings


def _union(
    growing: _Growing, base: TokenizerVocab, others: list[tuple[str, TokenizerVocab, int]], warnings: list[str],
    where: str,
) -> None:  # fmt: skip
    """Plain tokens the base lacks, model by model in id order, then added tokens (first definition wins)."""
    added: dict[str, Mapping[str, Any]] = {t: p for t, p in base.added.items()}
    for label, vocab, limit in others:
        for token, props in vocab.added.items():
            if vocab.ids[token] >= limit:
                continue
            if token not in added:
                added[token] = props
            elif dict(added[token]) != dict(props):
                warnings.append(
                    f"{where}: {label} defines added token {token!r} differently; the first definition is kept"
                )
    for _, vocab, limit in others:
        for token, i in sorted(vocab.ids.items(), key=lambda kv: kv[1]):
            if i < limit and token not in added and token not in growing.ids:
                growing.add(token, None)
    for token, props in added.items():
        if token not in base.added:
            growing.add(token, props)


def _permutation(ids: Mapping[str, int], vocab: TokenizerVocab, limit: int) -> np.ndarray:
    """New id → the model's id for the same token, −1 where it lacks the token or its id is past ``limit``."""
    perm = np.full(max(ids.values(), default=-1) + 1, -1, dtype=np.int64)
    for token, new in ids.items():
        old = vocab.ids.get(token)
        if old is not None and old < limit:
            perm[new] = old
    return perm


def row_map(
    merged: MergedVocabulary,
    labels: Sequence[str],
    row_counts: Sequence[int],
    base: str | None,
    tensor: str,
    token_label: Callable[[Any], str],
    warnings: list[str],
) -> RowMap | None:
    """Where each row of tensor ``tensor``'s re-indexed inputs comes from; ``labels`` are its inputs (job
    order) with their row counts. ``None`` where every input is already in place (same tokens, same ids)."""
    size, rows = len(merged.permutations[labels[0]]), merged.rows
    is_token = np.zeros(rows, dtype=bool)
    is_token[np.fromiter(merged.ids.values(), dtype=np.int64, count=len(merged.ids))] = True
    own = []
    for label, count in zip(labels, row_counts, strict=True):
        perm = merged.permutations[label]
        column = np.full(rows, OWN_PAD_MEAN, dtype=np.int64)
        column[:size] = np.where((perm >= 0) & (perm < count), perm, OWN_FILL)
        column[~is_token] = OWN_PAD_MEAN
        # a row that no token uses, in the output nor in this input, stays where it is (a padded vocabulary)
        used = np.zeros(count, dtype=bool)
        vocab_ids = np.fromiter(merged.vocabs[label].ids.values(), dtype=np.int64)
        used[vocab_ids[vocab_ids < count]] = True
        spare = np.flatnonzero(~is_token[: min(rows, count)] & ~used[: min(rows, count)])
        column[spare] = spare
        own.append(column)
    present = np.stack([o[:size] >= 0 for o in own])  # (K, V)
    count = present.sum(axis=0)
    donor = present.argmax(axis=0)
    fill_from = np.full(rows, FILL_MEAN, dtype=np.int64)
    fill_row = np.zeros(rows, dtype=np.int64)
    k_base = labels.index(base) if base in labels else None
    head = fill_from[:size]
    head[count == 0] = FILL_ZERO
    if k_base is not None:
        has_base = present[k_base] & (count > 1)
        head[has_base] = k_base
        fill_row[:size][has_base] = own[k_base][:size][has_base]
    single = count == 1
    head[single] = donor[single]
    fill_row[:size][single] = np.stack(own)[donor[single], np.flatnonzero(single)]
    for token, spec in merged.spec.tokens.items():
        _configure(merged, token, spec, labels, row_counts, own, fill_from, fill_row, tensor, token_label)
    needed = np.zeros(rows, dtype=bool)
    for column in own:
        needed |= column == OWN_FILL
    configured = {merged.ids[t] for t, s in merged.spec.tokens.items() if s.source is not None}
    orphans = [t for t, i in merged.ids.items() if needed[i] and fill_from[i] == FILL_ZERO and i not in configured]
    if orphans:
        shown = ", ".join(repr(t) for t in orphans[:5]) + (", …" if len(orphans) > 5 else "")
        warnings.append(f"tensor {tensor}: {len(orphans)} token(s) are in no input ({shown}); their rows are zeros")
    if all(len(o) == c and np.array_equal(o, np.arange(c)) for o, c in zip(own, row_counts, strict=True)):
        return None
    return RowMap(rows, tuple(own), fill_from, fill_row, is_token)


def _configure(
    merged: MergedVocabulary, token: str, spec: TokenSpec, labels: Sequence[str], row_counts: Sequence[int],
    own: list[np.ndarray], fill_from: np.ndarray, fill_row: np.ndarray, tensor: str,
    token_label: Callable[[Any], str],
) -> None:  # fmt: skip
    """A ``tokens`` entry: its source fills the rows of inputs that lack the token (of every input when
    forced); an entry without a source only adds the token, which the default rules then fill."""
    t = merged.ids[token]
    if spec.force:
        for column in own:
            column[t] = OWN_FILL
    source = spec.source
    if source is None or not any(column[t] == OWN_FILL for column in own):
        return
    where = f"tokenizer.tokens.{token}.source"
    if source.kind == "zero":
        fill_from[t] = FILL_ZERO
        return
    label = token_label(source.model)
    if label not in labels:
        raise GiftMergeError(f"{where}: {label} is not an input of tensor {tensor} (inputs: {', '.join(labels)})")
    k = labels.index(label)
    if source.kind == "model":
        row = int(merged.permutations[label][t])
        if row < 0 or row >= row_counts[k]:
            raise GiftMergeError(f"{where}: {label} has no token {token!r} to take its row from")
    elif source.token is not None:
        found = merged.vocabs[label].ids.get(source.token)
        if found is None:
            raise GiftMergeError(f"{where}.token: {label} has no token {source.token!r}")
        row = found
    else:
        row = int(source.token_id or 0)
    if row >= row_counts[k]:
        raise GiftMergeError(f"{where}: row {row} is past the {row_counts[k]} rows of {label}'s {tensor}")
    fill_from[t], fill_row[t] = k, row


def remap_jobs(
    jobs: list[Any], merged: MergedVocabulary, models: Mapping[str, ModelInfo], base_of: Callable[[Any], str | None],
    token_label: Callable[[Any], str], warnings: list[str],
) -> list[Any]:  # fmt: skip
    """``jobs`` with each vocabulary tensor re-indexed to the merged vocabulary: its output rows and the
    :class:`RowMap` of its inputs."""
    result = []
    for job in jobs:
        if job.copy or not is_vocab_tensor(job.name) or not job.shape:
            result.append(job)
            continue
        labels = [s.model for s in job.sources]
        shapes = [models[s.model].tensors[s.name][0] for s in job.sources]
        for src, shape in zip(job.sources, shapes, strict=True):
            if tuple(shape[1:]) != tuple(job.shape[1:]):
                raise GiftMergeError(f"tensor {job.name}: {src.model} has shape {list(shape)}, expected [*, "
                                     f"{', '.join(str(d) for d in job.shape[1:])}]")  # fmt: skip
        rows = row_map(merged, labels, [s[0] for s in shapes], base_of(job), job.name, token_label, warnings)
        if rows is not None and any(s.delta for s in job.sources):
            raise GiftMergeError(f"tensor {job.name}: {job.operator} merges adapter changes, which cannot be "
                                 "re-indexed to a merged vocabulary; drop the tokenizer setting")  # fmt: skip
        shape = (merged.rows, *job.shape[1:])
        result.append(replace(job, shape=shape, rows=None, row_map=rows))
    return result
