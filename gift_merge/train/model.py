"""Loading models and tokenizers, choosing LoRA targets, and splitting a causal LM into body and head.

Both annotation and training need the final hidden states rather than the logits, so that the output
head can be applied to the few rows that matter, chunk by chunk. :func:`split_head` finds the body and
the head of any ``*ForCausalLM`` and checks, on a short input, that ``head(body(x))`` reproduces the
model's own logits; architectures that transform logits after the head (Gemma-2's soft-capping,
Cohere's logit scale) fail the check and use the full forward pass instead.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from gift_merge.devices import torch_device
from gift_merge.dtypes import parse_dtype
from gift_merge.errors import GiftMergeError
from gift_merge.hf_quiet import quiet_transformers
from gift_merge.io.locate import locate
from gift_merge.io.reader import INDEX_NAME, SINGLE_NAME, CheckpointReader
from gift_merge.train.targets import OUTPUT_HEAD, choose_targets

log = logging.getLogger(__name__)


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` → ``cuda`` (``cuda:LOCAL_RANK`` under torchrun) when available, else ``cpu``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank or 0)
        return torch.device("cpu")
    device = torch_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank or 0)
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → bfloat16 on a GPU (what the paper trains and annotates in), float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(name, "--dtype").torch


def load_tokenizer(reference: str) -> tuple[PreTrainedTokenizerBase, Path]:
    folder = locate(reference)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise GiftMergeError(f"{reference}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from exc
    return tokenizer, folder


def check_weights(folder: Path) -> None:
    """Refuse a damaged safetensors checkpoint in one line naming the file, as a merge does.

    transformers reads ``model.safetensors``, else the shards of ``model.safetensors.index.json``, and on a
    damaged header or a truncated shard ends in safetensors' own message and a traceback. Opening the
    folder with the merge's :class:`CheckpointReader` checks those files' headers, sizes and index as
    strictly as ``validate`` does, in milliseconds, reading no tensor. A folder with neither file is left
    to transformers (pickled ``.bin`` weights, which it loads with ``weights_only``).
    """
    if (folder / SINGLE_NAME).is_file() or (folder / INDEX_NAME).is_file():
        CheckpointReader(folder)


def load_model(folder: Path, dtype: torch.dtype, device: torch.device, *, quiet: bool = False) -> PreTrainedModel:
    check_weights(folder)
    # transformers' loading bar is useful on a terminal for a large model, and noise in a log file
    with quiet_transformers() if quiet or not sys.stderr.isatty() else contextlib.nullcontext():
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise GiftMergeError(f"{folder}: cannot load as a causal LM ({str(exc).splitlines()[0]})") from exc
    model.to(device)  # type: ignore[arg-type]  # transformers types .to() too narrowly
    return model


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Padding never reaches the loss or the scores, so any id works; prefer the tokenizer's own."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if isinstance(candidate, int):
            return candidate
    return 0


def eos_id(tokenizer: PreTrainedTokenizerBase, eos_token: str | None, origin: str = "") -> tuple[int, str]:
    """The id and text of the end-of-response token: ``eos_token`` if given, else the tokenizer's EOS.

    ``origin`` says where a resolved ``eos_token`` came from, for the error when it is not one token.
    """
    token = eos_token if eos_token is not None else tokenizer.eos_token
    if not token:
        raise GiftMergeError("the base tokenizer has no EOS token; pass --eos-token")
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise GiftMergeError(
            f"--eos-token {token!r}{origin}: is {len(ids)} tokens of the base tokenizer, expected one special token"
        )
    return int(ids[0]), str(token)


def chat_end_token(tokenizer: PreTrainedTokenizerBase, source: str) -> str:
    """The special token that closes a turn of ``tokenizer``'s chat template (``<|im_end|>``, ``<|eot_id|>`` …).

    Found by rendering a short conversation and taking the first special token after the last message's
    text, so it is whatever the template really emits, not a guess from the model's name. That token is
    what an instruct model was taught to stop with, hence what the GIFT authors append to training
    responses for Llama 3.
    """
    from jinja2 import TemplateError

    marker = "gift-merge-reply-7d2a"  # plain text that no template alters
    probes = (
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}],  # the assistant's turn
        [{"role": "user", "content": marker}],  # for templates that refuse to end on an assistant message
    )
    special = set(tokenizer.all_special_tokens)
    special |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    for messages in probes:
        try:
            text = str(tokenizer.apply_chat_template(messages, tokenize=False))
        except (TemplateError, ValueError):  # no template, or one that rejects this conversation
            continue
        at = text.find(marker)
        if at < 0:
            continue
        after = tokenizer(text[at + len(marker) :], add_special_tokens=False)["input_ids"]
        found = next((t for t in tokenizer.convert_ids_to_tokens(after) if t in special), None)
        if found is not None:
            return str(found)
    raise GiftMergeError(
        f"--eos-token chat_end: cannot find the end-of-turn token of {source}'s chat template; "
        "pass the token itself, e.g. --eos-token '<|eot_id|>'"
    )


def lora_targets(model: nn.Module, requested: tuple[str, ...] | None) -> tuple[list[str], bool]:
    """LoRA target module names, and whether they are GPT-2 ``Conv1D`` layers (``fan_in_fan_out``).

    The choice itself is :func:`~gift_merge.train.targets.choose_targets`, shared with recipe planning.
    """
    leaves: dict[str, list[nn.Module]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | Conv1D):
            leaves.setdefault(name.rsplit(".", 1)[-1], []).append(module)
    leaves.pop(OUTPUT_HEAD, None)
    names = choose_targets(leaves, requested, type(model).__name__)
    conv = any(isinstance(m, Conv1D) for n in names for m in leaves.get(n, []))
    return names, conv


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer in the backward; non-reentrant, so frozen inputs need no grad hack."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@dataclass
class Split:
    """A causal LM as ``body`` (ids → final hidden states) and ``head`` (hidden → logits), if they compose."""

    body: nn.Module | None  # None: use the model's own logits
    head: nn.Module


def split_head(model: PreTrainedModel) -> Split:
    """Body and head of ``model``, verified to reproduce its logits on a short input."""
    body = model.base_model if model.base_model is not model else None
    head = model.get_output_embeddings()
    if body is None or head is None:
        return Split(None, nn.Identity())
    vocab = int(getattr(head, "out_features", 0) or model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (1, 8), generator=generator).to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits.float()
        got = head(body(input_ids=ids, use_cache=False).last_hidden_state).float()
    model.train(was_training)
    if got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-2, atol=1e-3):
        return Split(body, head)
    log.warning("%s transforms its logits after the output head; using full logits", type(model).__name__)
    return Split(None, head)


def final_hidden(
    model: nn.Module, split: Split, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, nn.Module]:
    """``(hidden (B, T, H), head)`` or, for models whose head does not compose, ``(logits, Identity)``."""
    if split.body is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits, nn.Identity()
    out = split.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state, split.head
