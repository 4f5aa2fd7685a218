"""Reading rows, building prompts, and tokenising the way the GIFT authors do."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from gift_merge.errors import GiftMergeError
from gift_merge.train.data import PromptBuilder, annotation_span, encode_pairs, read_jsonl, training_ids
from gift_merge.train.weights import build_sequence
from tests.train.conftest import DATA, NUMINA


@pytest.fixture(scope="module")
def tokenizer(tiny: dict[str, Path]) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny["instruct"])


def test_authors_annotated_format_is_read_as_is(tokenizer: PreTrainedTokenizerBase) -> None:
    builder = PromptBuilder(None, tokenizer, "instruct")
    rows = read_jsonl(DATA / "gift_authors_format.jsonl")
    first = builder.example(*rows[0], "f")
    assert first.response == "$\\boxed{15}$"
    assert first.scores == (0.8125, 0.00019, 0.99609375, 1.0, 0.5)  # element [0] of each pair, unchanged
    assert builder.example(*rows[1], "f").scores == (1e-06,)


def test_row_formats_give_the_same_prompt(tokenizer: PreTrainedTokenizerBase) -> None:
    builder = PromptBuilder(None, tokenizer, "instruct")
    chat = "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n"
    by_instruction = builder.example(1, {"instruction": "Add 2 and 3.", "response": "5"}, "f")
    by_messages = builder.example(
        1, {"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]}, "f"
    )
    by_prompt = builder.example(1, {"prompt": chat, "response": "5"}, "f")  # used verbatim
    assert by_instruction.prompt == by_messages.prompt == by_prompt.prompt == chat
    assert by_instruction.response == by_messages.response == "5"
    assert by_instruction.scores is None

    template = PromptBuilder("Q: {instruction}\nA:", tokenizer, "instruct")
    assert template.example(1, {"instruction": "hi", "response": " yo"}, "f").prompt == "Q: hi\nA:"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"instruction": "x"}, "`response` must be a string"),
        ({"question": "x", "answer": "y"}, "expected `instruction`, `prompt` or `messages`"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}, "last message"),
        ({"instruction": "x", "response": "y", "scores": [[1.5, 1.5]]}, "probabilities in [0, 1]"),
        ({"instruction": "x", "input": "z", "response": "y"}, "`input` field"),
    ],
)
def test_bad_rows_name_file_and_line(tokenizer: PreTrainedTokenizerBase, row: dict, message: str) -> None:
    with pytest.raises(GiftMergeError, match=rf"^data\.jsonl:7: .*{message[:20]}".replace("[", r"\[")):
        PromptBuilder(None, tokenizer, "m").example(7, row, "data.jsonl")


def test_missing_chat_template_asks_for_a_prompt_template(tokenizer: PreTrainedTokenizerBase) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = None
    with pytest.raises(GiftMergeError, match="--prompt-template"):
        PromptBuilder(None, tokenizer, "m")


def test_read_jsonl_reports_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n\n{oops\n')
    with pytest.raises(GiftMergeError, match=r"d\.jsonl:3: invalid JSON"):
        read_jsonl(path)


@pytest.mark.parametrize("max_length", [24, 48, 96, 256])
def test_annotation_and_training_see_the_same_response_tokens(
    tokenizer: PreTrainedTokenizerBase, max_length: int
) -> None:
    """One score per response token, however truncation falls, so build_sequence accepts every row."""
    builder = PromptBuilder(None, tokenizer, "m")
    examples = [builder.example(line, row, "numina") for line, row in read_jsonl(NUMINA)]
    for ids, prompt_len in encode_pairs(tokenizer, examples):
        scored_ids, start = annotation_span(ids, prompt_len, max_length)
        n_scores = max(len(scored_ids) - 1 - start, 0)
        full, plen, cut = training_ids(ids, prompt_len, tokenizer.eos_token_id, max_length)
        assert full[: len(scored_ids)] == scored_ids
        seq = build_sequence(full, plen, [0.5] * n_scores, truncated=cut)
        assert seq.num_targets in (0, n_scores + 1)
        assert (seq.weights == 0.5).sum() == n_scores
