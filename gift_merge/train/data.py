"""Training rows → prompt and response strings → token ids, tokenised exactly as the GIFT authors do.

The authors (``sustech-nlp/gift``, ``confidence_anno.py`` and ``*_gift_2k.py``) never tokenise the
response on its own: they tokenise ``prompt + response`` jointly, without special tokens (the template
carries them), and take the prompt's own token count as the boundary. Annotation truncates to
``max_length − 1`` tokens and scores every token after the prompt; training appends the EOS token to the
response and truncates to ``max_length``, so both see the same response tokens and the scores line up one
to one (the EOS has no score and keeps weight 1). Reproducing that, rather than something tidier, is what
lets the authors' annotated files be used as they are.

Rows may be ``{instruction, response}`` (the instruction becomes one user message of the chat template,
or fills ``{instruction}`` of a prompt template), ``{prompt, response}`` (the prompt is used verbatim,
already formatted) or ``{messages: [...]}`` (the last message is the assistant's response, the earlier
ones go through the chat template). A ``scores`` field, ``[[q, q], …]`` or ``[q, …]``, is read as is.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gift_merge.errors import GiftMergeError
from gift_merge.train.prompts import fill_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Example:
    """One training pair: the prompt ready to tokenise, the response, and its scores when annotated."""

    line: int  # 1-based line number in the source file, for error messages
    prompt: str
    response: str
    scores: tuple[float, ...] | None


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` for every non-blank line of a JSON Lines file."""
    rows = list(iter_jsonl(path))
    if not rows:
        raise GiftMergeError(f"{path}: no rows")
    return rows


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """:func:`read_jsonl` one row at a time (a check of the first row need not read the file)."""
    path = Path(path)
    try:
        # bytes, decoded line by line, so that a non-UTF-8 byte is reported at its offset in the file
        with path.open("rb") as handle:
            offset = 0
            for number, raw in enumerate(handle, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    where = f"byte 0x{raw[exc.start]:02x} at offset {offset + exc.start}"
                    raise GiftMergeError(f"{path}:{number}: not UTF-8 ({where}); JSON Lines files are UTF-8") from None
                offset += len(raw)
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise GiftMergeError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise GiftMergeError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                yield number, row
    except OSError as exc:
        raise GiftMergeError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_scores(value: Any, where: str) -> tuple[float, ...]:
    """The authors' ``[[q, q], …]`` (element 0 is used, as their trainer does) or a flat ``[q, …]``."""
    if not isinstance(value, list):
        raise GiftMergeError(f"{where}: scores must be a list, got {type(value).__name__}")
    scores = []
    for item in value:
        q = item[0] if isinstance(item, list) and item else item
        if isinstance(q, bool) or not isinstance(q, int | float) or not (0.0 <= q <= 1.0) or math.isnan(q):
            raise GiftMergeError(f"{where}: scores must be probabilities in [0, 1], got {item!r}")
        scores.append(float(q))
    return tuple(scores)


class PromptBuilder:
    """Formats a row's prompt with a chat template (the instruct model's) or a ``{instruction}`` template.

    The same builder serves annotation and training, so the base model is trained on exactly the prompt
    string the instruct model was scored on: that is the point of GIFT's "instruct template" rule.
    """

    def __init__(self, template: str | None, chat_tokenizer: PreTrainedTokenizerBase, source: str) -> None:
        self.template = template
        self.tokenizer = chat_tokenizer
        self.source = source
        if template is None and not getattr(chat_tokenizer, "chat_template", None):
            raise GiftMergeError(
                f"{source}: the tokenizer has no chat template; pass --prompt-template with {{instruction}}"
            )

    def describe(self) -> str:
        """What formats prompts, for the record in ``gift.json``."""
        return f"template: {self.template}" if self.template is not None else f"chat template of {self.source}"

    def _chat(self, messages: list[dict[str, Any]]) -> str:
        if self.template is not None:
            roles = [m.get("role") for m in messages]
            if roles != ["user"]:
                raise ValueError(f"a prompt template or preset takes one user message, got roles {roles}")
            return fill_template(self.template, str(messages[0].get("content", "")))
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)

    def example(self, line: int, row: dict[str, Any], where: str) -> Example:
        """Turn one row into an :class:`Example`; ``where`` names the file for errors."""
        at = f"{where}:{line}"
        try:
            if "messages" in row:
                messages = row["messages"]
                if (
                    not isinstance(messages, list)
                    or len(messages) < 2
                    or not all(isinstance(m, dict) for m in messages)
                ):
                    raise ValueError("messages must be a list of at least two {role, content} objects")
                if messages[-1].get("role") != "assistant":
                    raise ValueError("the last message must be the assistant's response")
                prompt, response = self._chat(messages[:-1]), messages[-1].get("content")
            elif "instruction" in row:
                if row.get("input"):
                    raise ValueError("an `input` field is not supported; fold it into `instruction`")
                prompt = self._chat([{"role": "user", "content": _text(row["instruction"], "instruction")}])
                response = row.get("response")
            elif "prompt" in row:
                prompt, response = _text(row["prompt"], "prompt"), row.get("response")
            else:
                raise ValueError("expected `instruction`, `prompt` or `messages` with a `response`")
            response = _text(response, "response")
        except ValueError as exc:
            raise GiftMergeError(f"{at}: {exc}") from None
        if not prompt:
            raise GiftMergeError(f"{at}: empty prompt")
        scores = parse_scores(row["scores"], at) if "scores" in row else None
        return Example(line=line, prompt=prompt, response=response, scores=scores)


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"`{key}` must be a string, got {type(value).__name__}")
    return value


def encode_pairs(tokenizer: PreTrainedTokenizerBase, examples: list[Example]) -> list[tuple[list[int], int]]:
    """``(ids of prompt + response, prompt token count)`` per example, no special tokens, untruncated.

    Tokenising the concatenated text (not prompt ids + response ids) is the authors' choice, and the
    scores are defined on that tokenisation.
    """
    if not examples:
        return []
    # verbose=False: texts longer than the model's context are expected here; truncation comes later.
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False, verbose=False)["input_ids"]
    fulls = tokenizer([e.prompt + e.response for e in examples], add_special_tokens=False, verbose=False)["input_ids"]
    return [(list(full), len(prompt)) for full, prompt in zip(fulls, prompts, strict=True)]


def annotation_span(ids: list[int], prompt_len: int, max_length: int) -> tuple[list[int], int]:
    """The ids the authors score (truncated to ``max_length − 1``) and the first scored logit position.

    Position ``p`` of the logits predicts ``ids[p + 1]``; scoring starts at ``prompt_len − 1``, so there
    is one score per response token and none when truncation left no response.
    """
    ids = ids[: max_length - 1]
    return ids, max(prompt_len - 1, 0)


def training_ids(ids: list[int], prompt_len: int, eos_id: int, max_length: int) -> tuple[list[int], int, bool]:
    """``prompt + response + EOS`` truncated to ``max_length``; also the prompt length and whether it was cut.

    Identical to the authors' tokenising of the text ``prompt + response + eos_token`` whenever the EOS is
    one special token, which it always is.
    """
    full = [*ids, eos_id]
    return full[:max_length], min(prompt_len, max_length), len(full) > max_length
