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
  continues from; ``OUT`` appears only when every row is done;
- shards (``--num-shards``, or the processes of torchrun) score whole batches of the single run, so the
  joined ``OUT`` holds the same bytes (:mod:`gift_merge.train.annotation_shards`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from gift_merge.errors import GiftMergeError
from gift_merge.progress import progress
from gift_merge.train import distributed
from gift_merge.train.annotation_shards import (
    Layout,
    Rows,
    combine,
    missing_shards,
    settings_path,
    shard_path,
    write_atomically,
)
from gift_merge.train.config import AnnotateConfig
from gift_merge.train.data import PromptBuilder, annotation_span, encode_pairs, read_jsonl
from gift_merge.train.distributed import Ranks
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


def annotate(config: AnnotateConfig, *, quiet: bool = False, ranks: Ranks | None = None) -> Path:
    """Write ``config.out``: every input row plus ``"scores"``. Returns the path written.

    Resumable: rows already in ``OUT.partial`` (or in an incomplete ``OUT``) are checked against the
    input and skipped. An ``OUT`` that already holds every row is left as it is.

    With ``config.shard`` of ``config.num_shards``, only that shard's rows are scored, into
    ``OUT.shard-I-of-N`` (resumable the same way), and the shard that completes the set joins them into
    ``OUT``; ``config.combine`` only joins. Under torchrun (``ranks`` of more than one process) each
    process scores the shard of its rank and rank 0 joins them. Either way ``OUT`` holds the bytes one
    process writes (see :mod:`gift_merge.train.annotation_shards`).
    """
    ranks = ranks or Ranks()
    if ranks.distributed and (config.num_shards > 1 or config.combine):
        flag = "--combine" if config.combine else "--num-shards"
        raise GiftMergeError(f"{flag}: not under torchrun, which splits the rows over its {ranks.world} processes")
    num_shards, shard = (ranks.world, ranks.rank) if ranks.distributed else (config.num_shards, config.shard or 0)
    rows = read_jsonl(config.data)
    out = Path(config.out)
    tokenizer, folder = load_tokenizer(config.instruct)
    builder = PromptBuilder(config.template, tokenizer, config.instruct)
    examples = [builder.example(line, row, config.data) for line, row in rows]  # fail before loading
    spans = [annotation_span(ids, plen, config.max_length) for ids, plen in encode_pairs(tokenizer, examples)]
    lengths = [len(ids) for ids, _ in spans]
    layout = Layout.of(lengths, [len(ids) - 1 > start for ids, start in spans], config.batch_size, num_shards)
    inputs = _Inputs(rows, spans, layout, folder, pad_id(tokenizer))
    settings = {"instruct": str(folder), "prompt": builder.describe(), "max_length": config.max_length}
    local_rank = ranks.local_rank if ranks.distributed else None
    if num_shards == 1:
        _score_shard(config, inputs, out, 0, settings, local_rank=local_rank, quiet=quiet)
        return out

    settings |= {"batch_size": config.batch_size, "num_shards": num_shards}
    if _holds_all(out, rows):
        log.info("%s: already holds all %d rows", out, len(rows))
        return out
    if config.combine:
        return combine(out, rows, layout, settings)
    target = shard_path(out, shard, num_shards)
    _score_shard(config, inputs, target, shard, settings, local_rank=local_rank, quiet=quiet)
    if ranks.distributed:
        distributed.barrier(ranks)
        if ranks.is_main:
            combine(out, rows, layout, settings)
        distributed.barrier(ranks)  # every process returns once OUT exists
        return out
    if _holds_all(out, rows):  # another shard completed the set meanwhile and joined them
        return out
    missing = missing_shards(out, num_shards)
    if missing:
        log.info("%s written; %s appears when shard(s) %s are done", target, out, ", ".join(map(str, missing)))
        return target
    try:
        return combine(out, rows, layout, settings)  # this shard completed the set
    except (GiftMergeError, FileNotFoundError):
        if _holds_all(out, rows):  # a shard finishing at the same time joined them first, and deleted them
            return out
        raise


def _holds_all(out: Path, rows: Rows) -> bool:
    return out.exists() and _count_matching(out, rows, cut_torn=False) == len(rows)


@dataclass(frozen=True)
class _Inputs:
    """What every shard of a run shares: the input rows, their token spans, the layout and the model."""

    rows: Rows
    spans: list[tuple[list[int], int]]  # (ids, first scored position) per row
    layout: Layout
    folder: Path
    pad: int


def _score_shard(
    config: AnnotateConfig,
    inputs: _Inputs,
    target: Path,
    shard: int,
    settings: dict[str, Any],
    *,
    local_rank: int | None,
    quiet: bool,
) -> None:
    """Score ``shard``'s rows of the layout into ``target`` (through ``target.partial``).

    Sharded runs (``settings`` with ``num_shards``) also record their settings, dtype and device
    included, in ``target.json`` for :func:`combine` to check.
    """
    sharded = "num_shards" in settings
    rows, layout = inputs.rows, inputs.layout
    mine = [k for w in range(len(layout.windows)) for k in layout.rows_of(shard, w)]
    partial = target.with_name(target.name + ".partial")
    device = resolve_device(config.device, local_rank)
    dtype = resolve_dtype(config.dtype, device)
    if sharded:
        settings = {**settings, "dtype": str(dtype).removeprefix("torch."), "device": device.type}
        if target.exists():
            _check_settings(settings_path(target), settings)
    done = _resume(target, partial, [rows[k] for k in mine], settings)
    if done == len(mine) and target.exists():
        log.info("%s: already holds all %d rows", target, done)
        if sharded and not settings_path(target).exists():
            write_atomically(settings_path(target), json.dumps(settings) + "\n")
        return
    if done < len(mine):
        model = load_model(inputs.folder, dtype, device, quiet=quiet).eval()
        with (
            partial.open("a", encoding="utf-8") as handle,
            progress(total=len(mine), initial=done, unit="row", desc="annotate", quiet=quiet) as bar,
        ):
            empty = _write_windows(model, split_head(model), inputs, shard, done, handle, bar)
        if empty:
            log.warning("%d row(s) have no response tokens left after truncation to %d", empty, config.max_length - 1)
    partial.touch()  # a shard can own no rows
    if sharded:  # before the rename: a shard file never lacks its settings
        write_atomically(settings_path(target), json.dumps(settings) + "\n")
    partial.rename(target)
    settings_path(partial).unlink(missing_ok=True)


def _write_windows(
    model: nn.Module, split: Split, inputs: _Inputs, shard: int, done: int, handle: TextIO, bar: Any
) -> int:
    """Append ``shard``'s output lines after its first ``done`` ones, a window at a time; the empty rows."""
    device = next(model.parameters()).device
    layout, rows = inputs.layout, inputs.rows
    empty = 0
    position = 0  # rows of this shard in the windows before the current one
    for w in range(len(layout.windows)):
        own = layout.rows_of(shard, w)
        skip, position = max(done - position, 0), position + len(own)
        if skip >= len(own):
            continue
        written = set(own[:skip])  # a resumed window is scored whole: the same batches, the same bits
        scores: dict[int, list[float]] = {}
        for batch in layout.batches_of(shard, w):
            batch_scores = score_batch(model, split, [inputs.spans[k] for k in batch], inputs.pad, device)
            scores.update(zip(batch, batch_scores, strict=True))
            bar.update(sum(k not in written for k in batch))
        for k in own[skip:]:
            probs = scores.get(k, [])
            empty += not probs
            handle.write(json.dumps({**rows[k][1], "scores": [[q, q] for q in probs]}, ensure_ascii=False) + "\n")
        bar.update(sum(k not in scores for k in own[skip:]))
        handle.flush()
        os.fsync(handle.fileno())
    return empty


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


def _resume(out: Path, partial: Path, rows: Rows, settings: dict[str, Any]) -> int:
    """How many rows are already annotated; leaves the work file ``partial`` holding exactly those."""
    if out.exists() and not partial.exists():
        done = _count_matching(out, rows)
        if done == len(rows):
            return done
        out.rename(partial)  # an incomplete OUT (another tool, an older run): continue it
    settings_file = settings_path(partial)
    if partial.exists():
        _check_settings(settings_file, settings)
    partial.parent.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(settings) + "\n")
    return _count_matching(partial, rows) if partial.exists() else 0


def _check_settings(settings_file: Path, settings: dict[str, Any]) -> None:
    """Refuse to continue or reuse a file (named ``settings_file`` minus ``.json``) made with other settings."""
    if not settings_file.exists():
        return
    previous = json.loads(settings_file.read_text())
    if previous != settings:
        changed = next(k for k in settings if previous.get(k) != settings[k])
        made = settings_file.with_name(settings_file.name.removesuffix(".json"))
        raise GiftMergeError(
            f"{made}: was started with another {changed} ({previous.get(changed)!r}); delete it to restart"
        )


def _count_matching(path: Path, rows: Rows, *, cut_torn: bool = True) -> int:
    """Complete lines of ``path`` that match the input rows; with ``cut_torn``, a torn last line is cut off."""
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data) and cut_torn:
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
