"""The authors' prompts byte for byte, tokenised as they tokenise them, and the training EOS token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from gift_merge.errors import GiftMergeError
from gift_merge.train import TrainConfig
from gift_merge.train.config import AnnotateConfig
from gift_merge.train.data import PromptBuilder, read_jsonl
from gift_merge.train.dataset import TrainingSet, load_training_set
from gift_merge.train.distributed import Ranks
from gift_merge.train.model import chat_end_token
from gift_merge.train.prompts import PROMPT_PRESETS, format_prompt
from gift_merge.train.weights import IGNORE_INDEX
from tests.train.conftest import NUMINA

# Transcribed from the authors' confidence_anno.py (as documented in gift-method.md, lines 64–66); their
# placeholder is {query}.
ASK = "\nPlease reason step by step, and put your final answer within \\boxed{}."
AUTHORS = {
    "qwen25": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{query}"
    + ASK
    + "<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant."
    "<|eot_id|>\n<|start_header_id|>user<|end_header_id|>\n\n{query}"
    + ASK
    + "<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n\n",
    "deepseek_math": "User: {query}" + ASK + "\n\nAssistant:",
}
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def llama3(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer folder shaped like Llama 3's: its special tokens, a BOS it adds by default, EOS
    ``<|end_of_text|>``, and a chat template whose turns end with ``<|eot_id|>``."""
    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
    tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
    bos = tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tokenizer.chat_template = LLAMA3_TEMPLATE
    folder = tmp_path_factory.mktemp("llama3-tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


def training_set(base: Path, tmp_path: Path, **options: Any) -> tuple[TrainingSet, PreTrainedTokenizerBase]:
    """The sft training set of NUMINA, untruncated; only the tokenizer of ``base`` is loaded."""
    config = TrainConfig(base=str(base), data=str(NUMINA), out=str(tmp_path / "o"), mode="sft", max_length=1 << 20)
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = load_training_set(config.replace(**options), tokenizer, Ranks(), torch.float32, quiet=True)
    return data, tokenizer


def test_presets_are_the_authors_prompts_byte_for_byte(tiny: dict[str, Path]) -> None:
    assert set(PROMPT_PRESETS) == set(AUTHORS)
    assert "\\boxed{}" in ASK and "\x08" not in ASK  # a backslash and "boxed", not Python's "\b"
    tokenizer = AutoTokenizer.from_pretrained(tiny["instruct"])
    rows = read_jsonl(NUMINA)
    for name, authors in AUTHORS.items():
        builder = PromptBuilder(TrainConfig(base="b", data="d", out="o", prompt_preset=name).template, tokenizer, "m")
        for line, row in rows:
            expected = authors.replace("{query}", row["instruction"])
            assert builder.example(line, row, "numina").prompt == expected, (name, line)
            assert format_prompt(name, row["instruction"]) == expected
    assert AnnotateConfig(instruct="m", data="d", out="o", prompt_preset="llama3").template == PROMPT_PRESETS["llama3"]
    with pytest.raises(GiftMergeError, match=r"--prompt-preset: unknown preset 'qwen2\.5' \(did you mean 'qwen25'\?\)"):
        format_prompt("qwen2.5", "x")


@pytest.mark.parametrize("preset", list(AUTHORS))
def test_preset_ids_are_prompt_and_response_tokenised_jointly(
    tiny: dict[str, Path], llama3: Path, tmp_path: Path, preset: str
) -> None:
    base = llama3 if preset == "llama3" else tiny["base"]
    data, tokenizer = training_set(base, tmp_path, prompt_preset=preset)
    assert data.prompt == f"template: {PROMPT_PRESETS[preset]}"
    rows = read_jsonl(NUMINA)
    assert len(data.sequences) == len(rows)
    for sequence, (_, row) in zip(data.sequences, rows, strict=True):
        prompt = AUTHORS[preset].replace("{query}", row["instruction"])
        joint = tokenizer(prompt + row["response"], add_special_tokens=False)["input_ids"]
        assert sequence.input_ids.tolist() == [*joint, tokenizer.eos_token_id]
        prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        targets = (sequence.labels != IGNORE_INDEX).nonzero()[:, 0].tolist()
        assert targets == list(range(prompt_len - 1, len(joint)))  # every response token and the EOS
    if preset == "llama3":  # the template's BOS is the only one: the tokenizer adds none of its own here
        bos = tokenizer.bos_token_id
        assert tokenizer("x")["input_ids"][0] == bos  # (it would, by default)
        for sequence in data.sequences:
            ids = sequence.input_ids.tolist()
            assert ids[0] == bos and ids.count(bos) == 1


def test_prompt_preset_and_template_are_exclusive(tmp_path: Path) -> None:
    from gift_merge.train.config import train_config_from_yaml

    both = {"base": "b", "data": "d", "out": "o", "prompt_preset": "qwen25", "prompt_template": "Q: {instruction}"}
    with pytest.raises(GiftMergeError, match=r"^--prompt-preset: cannot be combined with --prompt-template; "):
        TrainConfig.from_mapping(both)
    recipe = tmp_path / "train.yaml"
    recipe.write_text(
        "train:\n  base: b\n  data: d\n  out: o\n  prompt_preset: qwen25\n  prompt_template: '{instruction}'\n"
    )
    with pytest.raises(GiftMergeError, match=r"train\.prompt_preset: cannot be combined with prompt_template; "):
        train_config_from_yaml(recipe)
    recipe.write_text("train:\n  base: b\n  data: d\n  out: o\n  prompt_template: 'Q: {instruction}'\n")
    config = train_config_from_yaml(recipe, {"prompt_preset": "llama3"})  # a flag replaces the file's template
    assert config.prompt_template is None and config.template == PROMPT_PRESETS["llama3"]
    with pytest.raises(GiftMergeError, match=r"^--prompt-preset: must be one of qwen25, llama3, deepseek_math"):
        TrainConfig.from_mapping({"base": "b", "data": "d", "out": "o", "prompt_preset": "llama"})


def test_chat_end_is_the_token_that_closes_a_turn(tiny: dict[str, Path], llama3: Path) -> None:
    assert chat_end_token(AutoTokenizer.from_pretrained(tiny["instruct"]), "chatml") == "<|im_end|>"
    assert chat_end_token(AutoTokenizer.from_pretrained(llama3), "llama3") == "<|eot_id|>"
    plain = AutoTokenizer.from_pretrained(tiny["instruct"])
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(GiftMergeError, match=r"chat_end: cannot find the end-of-turn token of plain's chat template"):
        chat_end_token(plain, "plain")


def test_eos_token_is_the_appended_id(tiny: dict[str, Path], llama3: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama3)
    eot, end = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    expected = {None: ("<|end_of_text|>", end), "<|eot_id|>": ("<|eot_id|>", eot), "chat_end": ("<|eot_id|>", eot)}
    for option, (text, token_id) in expected.items():
        data, _ = training_set(llama3, tmp_path, instruct=str(llama3), prompt_preset="llama3", eos_token=option)
        assert (data.eos_token, data.eos_id) == (text, token_id)
        assert {int(s.input_ids[-1]) for s in data.sequences} == {token_id}
        assert {int(s.weights[-2]) for s in data.sequences} == {1}  # the EOS is a target of weight 1
    # ChatML: chat_end is <|im_end|>, and without --instruct the base's own template is used
    data, tokenizer = training_set(tiny["base"], tmp_path, eos_token="chat_end")
    assert data.eos_token == "<|im_end|>" and data.eos_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(GiftMergeError, match=r"--eos-token '<\|eot_id\|>': is \d+ tokens of the base tokenizer"):
        training_set(tiny["base"], tmp_path, eos_token="<|eot_id|>")  # not a token of the ChatML tokenizer
    with pytest.raises(GiftMergeError, match=r"'<\|eot_id\|>' \(chat_end of .*\): is \d+ tokens"):
        training_set(tiny["base"], tmp_path, instruct=str(llama3), eos_token="chat_end")
