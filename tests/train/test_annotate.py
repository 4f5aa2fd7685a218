"""Annotation equals the authors' batch-size-1 computation with a plain transformers forward pass."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from gift_merge.cli import main
from gift_merge.errors import GiftMergeError
from gift_merge.train import AnnotateConfig, annotate
from gift_merge.train.data import read_jsonl
from tests.train.conftest import MAX_LENGTH, NUMINA


def authors_scores(model: Any, tokenizer: Any, prompt: Any, response: str, max_len: int) -> list[float]:
    """``compute_confidence_scores`` of the authors' confidence_anno.py, transcribed (batch size 1)."""
    prompt_len = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    ids = tokenizer(prompt + response, add_special_tokens=False).input_ids[: max_len - 1]
    if len(ids) <= prompt_len:
        return []
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    probs = torch.softmax(logits[:-1].float(), dim=-1)
    target = probs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return target[max(0, prompt_len - 1) :].tolist()


def test_scores_equal_a_direct_forward_pass(tiny: dict[str, Path], annotated: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny["instruct"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny["instruct"])
    inputs, outputs = read_jsonl(NUMINA), read_jsonl(annotated)
    assert len(outputs) == len(inputs)
    for (_, row), (_, out) in zip(inputs, outputs, strict=True):
        assert {k: v for k, v in out.items() if k != "scores"} == row  # input fields kept as they were
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["instruction"]}], tokenize=False, add_generation_prompt=True
        )
        expected = authors_scores(model, tokenizer, prompt, row["response"], MAX_LENGTH)
        assert all(a == b for a, b in out["scores"])  # the authors' [[q, q], …] pairs
        got = [a for a, _ in out["scores"]]
        assert len(got) == len(expected)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=0, atol=1e-6)
    assert sum(len(o["scores"]) for _, o in outputs) > 1000


def test_batch_size_does_not_change_scores(tiny: dict[str, Path], annotated: Path, tmp_path: Path) -> None:
    one = annotate(
        AnnotateConfig(
            str(tiny["instruct"]), str(NUMINA), str(tmp_path / "b1.jsonl"), max_length=MAX_LENGTH, batch_size=1
        ),
        quiet=True,
    )
    many = read_jsonl(annotated)  # batch size 16
    for (_, a), (_, b) in zip(read_jsonl(one), many, strict=True):
        torch.testing.assert_close(torch.tensor(a["scores"]), torch.tensor(b["scores"]), rtol=0, atol=1e-6)


def test_rerun_continues_a_partial_file(tiny: dict[str, Path], annotated: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed.jsonl"
    lines = annotated.read_text().splitlines(keepends=True)
    # An interrupted run: 5 complete lines and a torn sixth in OUT.partial.
    (tmp_path / "resumed.jsonl.partial").write_text("".join(lines[:5]) + lines[5][:40])
    config = AnnotateConfig(str(tiny["instruct"]), str(NUMINA), str(out), max_length=MAX_LENGTH, batch_size=8)
    annotate(config, quiet=True)
    assert not (tmp_path / "resumed.jsonl.partial").exists()
    got, expected = read_jsonl(out), read_jsonl(annotated)
    assert [r for _, r in got][:5] == [r for _, r in expected][:5]
    for (_, a), (_, b) in zip(got, expected, strict=True):
        torch.testing.assert_close(torch.tensor(a["scores"]), torch.tensor(b["scores"]), rtol=0, atol=1e-6)
    # Different data in the partial file is refused, not silently mixed.
    (tmp_path / "other.jsonl.partial").write_text(json.dumps({"instruction": "x", "response": "y"}) + "\n")
    with pytest.raises(GiftMergeError, match="does not match input line 1"):
        annotate(config.replace(out=str(tmp_path / "other.jsonl")), quiet=True)


def test_cli_annotates_messages_rows(tiny: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"What is {a}+{a}?"}, {"role": "assistant", "content": f"{2 * a}."}]}
        for a in range(3)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "chat_scored.jsonl"
    args = ["annotate", "--instruct", str(tiny["instruct"]), "--data", str(data), "--out", str(out), "--device", "cpu"]
    result = CliRunner().invoke(main, ["--quiet", *args])
    assert result.exit_code == 0, result.output
    scored = read_jsonl(out)
    assert [r["messages"] for _, r in scored] == [r["messages"] for r in rows]
    assert all(0 < len(r["scores"]) <= 4 for _, r in scored)

    bad = CliRunner().invoke(main, ["annotate", "--instruct", str(tiny["instruct"]), "--data", str(data)])
    assert bad.exit_code == 2 and "--out: required" in bad.output
