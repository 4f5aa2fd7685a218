"""GIFT's annotation pass: q_t = p_instruct(y_t | x, y_<t) for every response token (Eq. 3).

Same numbers as the authors' ``confidence_anno.py`` (prompt via the instruct template, ``prompt +
response`` tokenised jointly, truncation to ``max_length − 1``, one score per response token, written
as ``"scores": [[q, q], …]``), computed faster:

- batches of similar length (rows sorted by length within a window), right-padded, so every token
  keeps its position and its score matches batch size 1 to float rounding;
- only the response positions go through the output head, chunk by chunk, and each probability is
  ``exp(logit[y] − logsumexp(logits))`` in fp32 — never a full softmax over the vocabulary for the
  whole batch (the authors take it in bf16, which also rounds q to 3 significant digits);
- output lines follow input order and are flushed window by window into ``OUT.partial``, which a rerun
  continues from; ``OUT`` appears only when every row is done.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gift_merge.errors import GiftMergeError
from gift_merge.progress import progress
from gift_merge.train.config import AnnotateConfig
from gift_merge.train.data import Example, PromptBuilder, annotation_span, encode_pairs, read_jsonl
from gift_merge.train.loss import chunk_rows
from gift_merge.train.model import (
    Split,
    final_hidden,
    load_model,
    load_tokenizer,
    pad_id,
    resolve_device,
    resolve_dtype,
    split_head,
)

log = logging.getLogger(__name__)

WINDOW_BATCHES = 32
"""Rows are length-sorted within windows of this many batches: long enough to pad little, short
enough that a killed run loses little and output can stay in input order."""


def annotate(config: AnnotateConfig, *, quiet: bool = False) -> Path:
    """Write ``config.out``: every input row plus ``"scores"``. Returns the output path.

    Resumable: rows already in ``OUT.partial`` (or in an incomplete ``OUT``) are checked against the
    input and skipped. An ``OUT`` that already holds every row is left as it is.
    """
    rows = read_jsonl(config.data)
    out = Path(config.out)
    partial = out.with_name(out.name + ".partial")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    tokenizer, folder = load_tokenizer(config.instruct)
    builder = PromptBuilder(config.template, tokenizer, config.instruct)
    examples = [builder.example(line, row, config.data) for line, row in rows]  # fail before loading
    settings = {"instruct": str(folder), "prompt": builder.describe(), "max_length": config.max_length}

    done = _resume(out, partial, rows, settings)
    if done == len(rows) and out.exists():
        log.info("%s: already holds all %d rows", out, done)
        return out
    model = load_model(folder, dtype, device, quiet=quiet).eval()
    split = split_head(model)
    pad = pad_id(tokenizer)
    window = config.batch_size * WINDOW_BATCHES
    empty = 0
    with (
        partial.open("a", encoding="utf-8") as handle,
        progress(total=len(rows), initial=done, unit="row", desc="annotate", quiet=quiet) as bar,
    ):
        for start in range(done, len(rows), window):
            chunk = examples[start : start + window]
            scores = score_examples(model, split, tokenizer, chunk, config.max_length, config.batch_size, pad, bar)
            for (_, row), probs in zip(rows[start : start + window], scores, strict=True):
                empty += not probs
                handle.write(json.dumps({**row, "scores": [[q, q] for q in probs]}, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    if empty:
        log.warning("%d row(s) have no response tokens left after truncation to %d", empty, config.max_length - 1)
    partial.rename(out)
    _settings_path(partial).unlink(missing_ok=True)
    return out


def score_examples(
    model: nn.Module,
    split: Split,
    tokenizer: Any,
    examples: list[Example],
    max_length: int,
    batch_size: int,
    pad: int,
    bar: Any = None,
) -> list[list[float]]:
    """The scores of ``examples``, in their order, computed in length-sorted padded batches."""
    spans = [annotation_span(ids, plen, max_length) for ids, plen in encode_pairs(tokenizer, examples)]
    results: list[list[float]] = [[] for _ in spans]
    scored = [k for k, (ids, start) in enumerate(spans) if len(ids) - 1 > start]
    order = sorted(scored, key=lambda k: len(spans[k][0]), reverse=True)
    device = next(model.parameters()).device
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        for k, probs in zip(batch, score_batch(model, split, [spans[k] for k in batch], pad, device), strict=True):
            results[k] = probs
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.update(len(spans) - len(scored))
    return results


@torch.inference_mode()
def score_batch(
    model: nn.Module, split: Split, spans: list[tuple[list[int], int]], pad: int, device: torch.device
) -> list[list[float]]:
    """For each ``(ids, start)``: the probability of ``ids[p + 1]`` at every position ``p ≥ start``."""
    width = max(len(ids) for ids, _ in spans)
    input_ids = torch.full((len(spans), width), pad, dtype=torch.long)
    mask = torch.zeros((len(spans), width), dtype=torch.long)
    rows: list[int] = []
    positions: list[int] = []
    for b, (ids, start) in enumerate(spans):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(ids)] = 1
        rows += [b] * (len(ids) - 1 - start)
        positions += range(start, len(ids) - 1)
    input_ids, mask = input_ids.to(device), mask.to(device)
    hidden, head = final_hidden(model, split, input_ids, mask)  # (B, T, H), or (B, T, V) logits
    row_index = torch.tensor(rows, device=device)
    pos_index = torch.tensor(positions, device=device)
    probs = label_probabilities(hidden[row_index, pos_index], head, input_ids[row_index, pos_index + 1])
    counts = [len(ids) - 1 - start for ids, start in spans]
    return [p.tolist() for p in torch.split(probs.cpu(), counts)]


def label_probabilities(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """``softmax(head(hidden))[label]`` per row (N,), in fp32, one (chunk, V) block at a time."""
    vocab = int(getattr(head, "out_features", 0)) or hidden.shape[-1]
    rows = chunk_rows(vocab)
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        logits = head(hidden[start : start + rows]).float()  # (n, V)
        picked = logits.gather(1, labels[start : start + rows, None])[:, 0]
        out[start : start + rows] = torch.exp(picked - torch.logsumexp(logits, dim=-1))
    return out


def _settings_path(partial: Path) -> Path:
    return partial.with_name(partial.name + ".json")


def _resume(out: Path, partial: Path, rows: list[tuple[int, dict[str, Any]]], settings: dict[str, Any]) -> int:
    """How many rows are already annotated; leaves the work file ``partial`` holding exactly those."""
    if out.exists() and not partial.exists():
        done = _count_matching(out, rows)
        if done == len(rows):
            return done
        out.rename(partial)  # an incomplete OUT (another tool, an older run): continue it
    settings_file = _settings_path(partial)
    if partial.exists() and settings_file.exists():
        previous = json.loads(settings_file.read_text())
        if previous != settings:
            changed = next(k for k in settings if previous.get(k) != settings[k])
            raise GiftMergeError(
                f"{partial}: was started with another {changed} ({previous.get(changed)!r}); delete it to restart"
            )
    partial.parent.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(settings) + "\n")
    return _count_matching(partial, rows) if partial.exists() else 0


def _count_matching(path: Path, rows: list[tuple[int, dict[str, Any]]]) -> int:
    """Complete lines of ``path`` that match the input rows; a torn last line is cut off."""
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with path.open("r+b") as handle:
            handle.truncate(keep)
    lines = data[:keep].decode("utf-8").splitlines()
    if len(lines) > len(rows):
        raise GiftMergeError(f"{path}: has {len(lines)} rows but the input has only {len(rows)}")
    for number, (text, (line, row)) in enumerate(zip(lines, rows, strict=False), start=1):
        try:
            written = json.loads(text)
        except json.JSONDecodeError:
            raise GiftMergeError(f"{path}:{number}: invalid JSON; delete the file to restart") from None
        if {k: v for k, v in written.items() if k != "scores"} != {k: v for k, v in row.items() if k != "scores"}:
            raise GiftMergeError(f"{path}:{number}: does not match input line {line}; was it made from other data?")
    return len(lines)
