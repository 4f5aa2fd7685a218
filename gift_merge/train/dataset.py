"""The training set: rows read, annotated if needed, formatted, tokenised and weighted.

When ``--mode gift`` meets data without scores and ``--instruct`` is given, annotation runs first and
its output is cached beside the adapter folder, named by a key over everything the scores depend on
(data bytes, instruct model, prompt format, max length, dtype), so a second run reuses it and a changed
setting never picks up stale scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from gift_merge.errors import GiftMergeError
from gift_merge.io.locate import locate
from gift_merge.train import distributed
from gift_merge.train.config import CHAT_END, AnnotateConfig, TrainConfig
from gift_merge.train.data import PromptBuilder, encode_pairs, file_sha256, read_jsonl, training_ids
from gift_merge.train.model import chat_end_token, eos_id, load_tokenizer
from gift_merge.train.weights import ScoreMismatch, TokenSequence, build_sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingSet:
    sequences: list[TokenSequence]
    data_sha256: str  # of --data as given
    annotations: Path | None  # the annotated file used, when annotation ran (or was reused)
    prompt: str  # how prompts were formatted
    eos_token: str  # the token appended after each response
    eos_id: int
    skipped: int  # rows with no response token left after truncation
    truncated: int  # rows cut at max_length


def _model_key(folder: Path) -> str:
    """Identity of a model folder for cache keys: its config and its weight files' names and sizes."""
    digest = hashlib.sha256(str(folder).encode())
    if (folder / "config.json").is_file():
        digest.update((folder / "config.json").read_bytes())
    for weight in sorted(folder.glob("*.safetensors")):
        digest.update(f"{weight.name}:{weight.stat().st_size}".encode())
    return digest.hexdigest()


def annotation_cache(config: TrainConfig, data_sha: str, prompt: str, dtype: torch.dtype) -> Path:
    assert config.instruct is not None
    key = {
        "data": data_sha,
        "instruct": _model_key(locate(config.instruct)),
        "prompt": prompt,
        "max_length": config.max_length,
        "dtype": str(dtype),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    out = config.out_path
    return out.parent / f"{out.name}.annotated-{digest}.jsonl"


def load_training_set(
    config: TrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    ranks: distributed.Ranks,
    dtype: torch.dtype,
    *,
    quiet: bool = False,
) -> TrainingSet:
    """Read ``config.data`` and turn every row into a :class:`TokenSequence` with its GIFT weights."""
    rows = read_jsonl(config.data)
    data_sha = file_sha256(config.data)
    # The instruct model's chat template formats prompts (unless a template or preset does) and ends turns.
    if config.instruct is not None:
        chat_tokenizer, chat_source = load_tokenizer(config.instruct)[0], config.instruct
    else:
        chat_tokenizer, chat_source = tokenizer, config.base
    builder = PromptBuilder(config.template, chat_tokenizer, chat_source)
    if config.eos_token == CHAT_END:
        end = chat_end_token(chat_tokenizer, chat_source)
        eos, eos_text = eos_id(tokenizer, end, f" (chat_end of {chat_source})")
    else:
        eos, eos_text = eos_id(tokenizer, config.eos_token)
    with_scores = sum("scores" in row for _, row in rows)
    if 0 < with_scores < len(rows):
        raise GiftMergeError(f"{config.data}: {with_scores} of {len(rows)} rows have scores; annotate all or none")
    source, annotations = config.data, None
    if config.mode == "gift" and not with_scores:
        if config.instruct is None:
            raise GiftMergeError(
                f"{config.data}: no scores; pass --instruct MODEL to annotate first, or use --mode sft"
            )
        annotations = annotation_cache(config, data_sha, builder.describe(), dtype)
        annotated = annotations.exists()
        distributed.barrier(ranks)  # every process decides on the same file state
        if not annotated:  # every process scores its share of the batches; rank 0 writes the file
            from gift_merge.train.annotation import annotate

            if ranks.is_main:
                log.info("annotating %s with %s into %s", config.data, config.instruct, annotations)
            annotate(
                AnnotateConfig(
                    instruct=config.instruct,
                    data=config.data,
                    out=str(annotations),
                    prompt_template=config.prompt_template,
                    prompt_preset=config.prompt_preset,
                    max_length=config.max_length,
                    batch_size=config.annotate_batch_size,
                    device=config.device if not ranks.distributed else "auto",
                    dtype=str(dtype).removeprefix("torch."),
                ),
                quiet=quiet or not ranks.is_main,
                ranks=ranks,
            )
        source = str(annotations)
        rows = read_jsonl(annotations)

    examples = [builder.example(line, row, source) for line, row in rows]
    sequences, skipped, truncated = [], 0, 0
    for example, (ids, prompt_len) in zip(examples, encode_pairs(tokenizer, examples), strict=True):
        full, prompt_len, cut = training_ids(ids, prompt_len, eos, config.max_length)
        scores = example.scores if config.mode == "gift" else None
        try:
            sequence = build_sequence(full, prompt_len, scores, gamma=config.gamma, floor=config.floor, truncated=cut)
        except ScoreMismatch as exc:
            raise GiftMergeError(
                f"{source}:{example.line}: {exc}; were the scores made with this tokenizer, prompt format and "
                "max length?"
            ) from None
        truncated += cut
        if sequence.num_targets == 0:
            skipped += 1
            continue
        sequences.append(sequence)
    if skipped:
        log.warning("%d row(s) skipped: the prompt fills all %d tokens", skipped, config.max_length)
    if not sequences:
        raise GiftMergeError(f"{config.data}: no row has a response token within {config.max_length} tokens")
    return TrainingSet(sequences, data_sha, annotations, builder.describe(), eos_text, eos, skipped, truncated)
