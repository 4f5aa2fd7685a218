"""``--prompt-preset``: lm-eval sends the GIFT authors' prompts byte for byte, tokenised as training saw them."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks must never reach the network

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("math_verify")
pytest.importorskip("rouge_score")

from click.testing import CliRunner

from gift_merge.cli import main
from gift_merge.errors import GiftMergeError
from gift_merge.evaluate.harness import EvalOptions, run_harness, task_manager, task_specs
from gift_merge.evaluate.tasks import TASKS_DIR
from gift_merge.recipe.loader import parse_recipe
from gift_merge.train.prompts import PROMPT_PRESETS, format_prompt

SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
SYSTEM = "You are a helpful assistant."


def authors_prompt(preset: str, question: str, suffix: str = SUFFIX) -> str:
    """The authors' prompts (``sustech-nlp/gift`` ``confidence_anno.py`` lines 19–44, as quoted in
    gift-method.md §1.3), spelt out here rather than read from PROMPT_PRESETS, so that a changed byte in
    a preset fails. ``suffix=""`` gives the wrapping the non-math tasks get."""
    if preset == "qwen25":
        return (
            "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n"
            "<|im_start|>user\n" + question + suffix + "<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
    if preset == "llama3":
        return (
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + SYSTEM + "<|eot_id|>\n"
            "<|start_header_id|>user<|end_header_id|>\n\n" + question + suffix + "<|eot_id|>\n"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )
    assert preset == "deepseek_math"
    return "User: " + question + suffix + "\n\nAssistant:"


def _rows(filename: str, n: int = 3) -> list[dict[str, Any]]:
    with (TASKS_DIR / "data" / filename).open(encoding="utf-8") as handle:
        return [json.loads(next(handle)) for _ in range(n)]


QUESTIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "gift_gsm8k": lambda row: row["question"],
    "gift_svamp": lambda row: row["Body"].strip() + " " + row["Question"].strip(),
}
FILES = {"gift_gsm8k": "gsm8k_test.jsonl", "gift_svamp": "svamp_test.jsonl"}


def _mmlu_text(row: dict[str, Any]) -> str:
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", row["choices"], strict=True))
    return row["question"].strip() + options + "\nAnswer:"


def _requests(options: EvalOptions, n: int = 3) -> dict[str, list[tuple[int, tuple[Any, ...]]]]:
    """Task → (document index, arguments) of the requests lm-eval builds for the first ``n`` documents,
    from the tasks exactly as :func:`run_harness` hands them to lm-eval."""
    manager = task_manager(options.tasks, options.prompt_preset)
    built = {}
    for spec in task_specs(options, manager):
        task = manager.load([spec])["tasks"][spec] if isinstance(spec, str) else spec
        task.build_all_requests(limit=n, apply_chat_template=options.chat_template)
        built[task.config.task] = [(instance.doc_id, instance.arguments) for instance in task.instances]
    return built


@pytest.mark.parametrize("preset", sorted(PROMPT_PRESETS))
def test_math_prompts_are_the_authors_bytes(preset: str) -> None:
    requests = _requests(EvalOptions(tasks=("gift_gsm8k", "gift_svamp"), prompt_preset=preset))
    for task, question in QUESTIONS.items():
        rows = _rows(FILES[task])
        prompts = [args[0] for _, args in sorted(requests[task], key=lambda r: r[0])]
        assert prompts == [authors_prompt(preset, question(row)) for row in rows], task
        assert prompts == [format_prompt(preset, question(row)) for row in rows], task


def test_default_prompts_are_unchanged() -> None:
    requests = _requests(EvalOptions(tasks=("gift_gsm8k", "gift_svamp", "gift_mmlu_stem"), chat_template=False))
    for task, question in QUESTIONS.items():
        prompts = [args[0] for _, args in sorted(requests[task], key=lambda r: r[0])]
        assert prompts == [question(row) + SUFFIX for row in _rows(FILES[task])]
    mmlu = _rows("mmlu_stem_test.jsonl", 1)[0]
    assert [args for i, args in requests["gift_mmlu_stem"] if i == 0] == [
        (_mmlu_text(mmlu), f" {letter}") for letter in "ABCD"
    ]


@pytest.mark.parametrize("preset", ["qwen25", "llama3"])
def test_other_tasks_get_the_preset_wrapping_without_the_math_suffix(preset: str) -> None:
    requests = _requests(EvalOptions(tasks=("gift_sni", "gift_mmlu_stem"), prompt_preset=preset), n=1)
    sni = _rows("sni_gen.jsonl", 1)[0]
    assert requests["gift_sni"][0][1][0] == authors_prompt(preset, sni["instruction"], suffix="")
    mmlu = _rows("mmlu_stem_test.jsonl", 1)[0]
    # the letter follows the assistant turn's opening directly, as under a chat template
    assert [args for _, args in requests["gift_mmlu_stem"]] == [
        (authors_prompt(preset, _mmlu_text(mmlu), suffix=""), letter) for letter in "ABCD"
    ]


def test_options_and_cache() -> None:
    options = EvalOptions(tasks=("gift_svamp",), prompt_preset="llama3")
    assert options.chat_template is False and options.record()["prompt_preset"] == "llama3"
    with pytest.raises(GiftMergeError, match="system-prompt: cannot be combined with --prompt-preset"):
        EvalOptions(tasks=("gift_svamp",), prompt_preset="llama3", system_prompt="Be brief.")
    with pytest.raises(GiftMergeError, match=r"unknown preset 'llama'.*did you mean 'llama3'"):
        EvalOptions(tasks=("gift_svamp",), prompt_preset="llama")
    with pytest.raises(GiftMergeError, match="shipped gift_\\* tasks only, not of 'gsm8k'"):
        EvalOptions(tasks=("gift_svamp", "gsm8k"), prompt_preset="qwen25")
    # one TaskManager per preset: lm-eval hands its metadata to the loaders that build the prompts
    assert task_manager(("gift_svamp",), "qwen25") is task_manager(("gift_svamp",), "qwen25")
    assert task_manager(("gift_svamp",), "qwen25") is not task_manager(("gift_svamp",), None)


def test_compare_eval_key() -> None:
    text = "compare:\n  tasks: [gift_svamp]\n  arms: {a: some/model}\n  eval: {prompt_preset: %s}\n"
    assert parse_recipe(text % "deepseek_math").compare.evaluation.prompt_preset == "deepseek_math"
    with pytest.raises(GiftMergeError, match=r"compare\.eval: prompt_preset: unknown preset 'qwen'"):
        parse_recipe(text % "qwen")


# Llama 3's special tokens; its tokenizer prepends <|begin_of_text|> unless told not to
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """A tiny tokenizer that knows Llama 3's special tokens and adds the BOS by default, as Llama 3's
    and DeepSeek's do, and a random model with positions for the whole prompts (no truncation)."""
    import torch
    from tokenizers import processors
    from transformers import LlamaConfig, LlamaForCausalLM

    from gift_merge.toy.tiny_models import build_tokenizer

    tokenizer = build_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    tokenizer.add_special_tokens({"bos_token": LLAMA3_SPECIALS[0], "additional_special_tokens": LLAMA3_SPECIALS})
    bos = tokenizer.convert_tokens_to_ids(LLAMA3_SPECIALS[0])
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{LLAMA3_SPECIALS[0]} $A", special_tokens=[(LLAMA3_SPECIALS[0], bos)]
    )
    tokenizer.model_max_length = 2048
    assert tokenizer("Hi").input_ids[0] == bos  # the default would add a BOS
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=bos, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.mark.parametrize("preset", ["llama3", "deepseek_math"])
def test_token_ids_are_the_training_tokenisation(
    preset: str, bos_model: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the model is fed equals ``tokenizer(prompt, add_special_tokens=False)``: Llama's prompt holds
    its one BOS as text, DeepSeek's has none, and lm-eval adds no other."""
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = bos_model
    fed: dict[str, list[list[int]]] = {"generate": [], "loglikelihood": []}
    generate, loglikelihood = HFLM._model_generate, HFLM._loglikelihood_tokens

    def record_generate(self: HFLM, context: Any, max_length: int, stop: list[str], **kwargs: Any) -> Any:
        for ids, mask in zip(context.tolist(), kwargs["attention_mask"].tolist(), strict=True):
            fed["generate"].append([i for i, keep in zip(ids, mask, strict=True) if keep])
        return generate(self, context, max_length, stop, **kwargs)

    def record_loglikelihood(self: HFLM, requests: list[Any], *args: Any, **kwargs: Any) -> Any:
        fed["loglikelihood"] += [context + continuation for _, context, continuation in requests]
        return loglikelihood(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_model_generate", record_generate)
    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", record_loglikelihood)
    options = EvalOptions(tasks=("gift_svamp", "gift_mmlu_stem"), prompt_preset=preset, limit=2, max_new_tokens=2)
    run_harness(model, tokenizer, options)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    svamp = [format_prompt(preset, QUESTIONS["gift_svamp"](row)) for row in _rows(FILES["gift_svamp"], 2)]
    assert sorted(fed["generate"]) == sorted(ids(prompt) for prompt in svamp)
    wrapping = PROMPT_PRESETS[preset].replace(SUFFIX, "")
    mmlu = [wrapping.replace("{instruction}", _mmlu_text(row)) for row in _rows("mmlu_stem_test.jsonl", 2)]
    assert sorted(fed["loglikelihood"]) == sorted(ids(prompt + letter) for prompt in mmlu for letter in "ABCD")
    bos = tokenizer.bos_token_id
    expected_bos = 1 if preset == "llama3" else 0
    assert all(seq.count(bos) == expected_bos for seq in fed["generate"] + fed["loglikelihood"])


def test_eval_command_logs_the_preset_prompt(llama: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "preset.json"
    args = ["eval", str(llama["instruct"]), "--tasks", "gift_svamp", "--prompt-preset", "qwen25", "--limit", "2",
            "--max-new-tokens", "4", "--log-samples", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["settings"]["prompt_preset"] == "qwen25" and record["settings"]["chat_template"] is False
    samples = sorted(record["samples"]["gift_svamp"], key=lambda s: s["doc_id"])
    requests = [s["arguments"] for s in samples]  # one per document: [(context, generation settings)]
    assert [request[0][0] for request in requests] == [
        authors_prompt("qwen25", QUESTIONS["gift_svamp"](row)) for row in _rows(FILES["gift_svamp"], 2)
    ]
    assert requests[0][0][1]["until"] == ["<|im_end|>"]  # the preset's end of turn; lm-eval adds the EOS itself
