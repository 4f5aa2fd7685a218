"""Training runs on a tiny Llama: exactness contracts, resume, outputs, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from gift_merge.cli import main
from gift_merge.errors import GiftMergeError
from gift_merge.train import TrainConfig, train
from gift_merge.train import loop as loop_module
from gift_merge.train.config import train_config_from_yaml
from gift_merge.train.data import read_jsonl
from tests.train.conftest import MAX_LENGTH, NUMINA, train_options
from tests.train.test_annotate import authors_scores


def run(tiny: dict[str, Path], data: Path, out: Path, **changes: Any) -> dict[str, torch.Tensor]:
    """Train and return the saved adapter tensors."""
    train(TrainConfig.from_mapping(train_options(tiny, data, out, **changes)), quiet=True)
    return load_file(str(out / "adapter_model.safetensors"))


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_all_ones_scores_give_the_sft_adapter_bit_for_bit(
    tiny: dict[str, Path], annotated: Path, tmp_path: Path
) -> None:
    ones = [{**row, "scores": [[1.0, 1.0]] * len(row["scores"])} for _, row in read_jsonl(annotated)]
    gift = run(tiny, write_rows(tmp_path / "ones.jsonl", ones), tmp_path / "gift", mode="gift")
    sft = run(tiny, NUMINA, tmp_path / "sft", mode="sft")
    assert gift.keys() == sft.keys() and len(gift) == 3 * 7 * 2  # 3 layers × 7 projections × (A, B)
    for name in gift:
        assert torch.equal(gift[name], sft[name]), name


def test_real_scores_change_the_adapter(tiny: dict[str, Path], annotated: Path, tmp_path: Path) -> None:
    gift = run(tiny, annotated, tmp_path / "gift")
    sft = run(tiny, annotated, tmp_path / "sft", mode="sft")  # same file: sft ignores the scores
    gamma0 = run(tiny, annotated, tmp_path / "gamma0", gamma=0.0)  # w = q^0 = 1: sft again
    b_names = [n for n in gift if "lora_B" in n]
    assert all(torch.equal(sft[n], gamma0[n]) for n in gift)
    differences = [float((gift[n] - sft[n]).abs().max()) for n in b_names]
    assert min(differences) > 1e-5


def test_loss_falls(tiny: dict[str, Path], annotated: Path, tmp_path: Path) -> None:
    train(
        TrainConfig.from_mapping(
            train_options(tiny, annotated, tmp_path / "out", epochs=4, grad_accum=1, lr=5e-3, r=8, dropout=0.0)
        ),
        quiet=True,
    )
    log = [json.loads(line) for line in (tmp_path / "out" / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 25)) and {r["epoch"] for r in log} == {1, 2, 3, 4}
    first = sum(r["loss"] for r in log if r["epoch"] == 1) / 6
    last = sum(r["loss"] for r in log if r["epoch"] == 4) / 6
    assert last < first - 0.3, (first, last)
    assert log[0]["lr"] == 0.0 and max(r["lr"] for r in log) == pytest.approx(5e-3)  # warmup, then decay
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in log)


def test_resume_gives_the_same_adapter(
    tiny: dict[str, Path], annotated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = {"grad_accum": 1}  # 6 steps
    straight = run(tiny, annotated, tmp_path / "straight", **options)

    def crash(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    monkeypatch.setattr(loop_module, "_after_step", crash)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, annotated, out, save_steps=2, **options)
    monkeypatch.undo()
    assert not out.exists()  # nothing half-written
    checkpoints = tmp_path / "resumed.checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-000002"]

    with pytest.raises(GiftMergeError, match=r"was made with lr=0\.001, this run has 0\.01"):
        run(tiny, annotated, out, resume=str(checkpoints), **{**options, "lr": 1e-2})
    resumed = run(tiny, annotated, out, save_steps=2, resume=str(checkpoints), **options)
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)
    assert not checkpoints.exists()  # removed once the adapter is written
    logs = [(tmp_path / d / "training_log.jsonl").read_text().splitlines() for d in ("straight", "resumed")]
    strip = [[{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in lines] for lines in logs]
    assert strip[0] == strip[1] and len(strip[0]) == 6


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside peft
def test_adapter_loads_in_peft_and_merges(tiny: dict[str, Path], annotated: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    run(tiny, annotated, out, lr=5e-3)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }

    base = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32)
    ids = torch.tensor([[4, 90, 88, 266, 204, 77, 78, 226]])
    with torch.no_grad():
        before = base(ids).logits
        peft_model = PeftModel.from_pretrained(base, str(out)).eval()
        adapted = peft_model(ids).logits
        merged = peft_model.merge_and_unload()(ids).logits
    assert not torch.allclose(before, adapted, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)

    record = json.loads((out / "gift.json").read_text())
    assert record["mode"] == "gift" and record["gamma"] == 1.0 and record["floor"] == 1e-4
    assert record["base_model"] == str(tiny["base"]) and record["instruct_model"] == str(tiny["instruct"])
    assert len(record["data_sha256"]) == 64 and record["examples"] == 24 and record["steps"] == 3
    assert set(record["versions"]) == {"gift-merge", "torch", "transformers", "peft"}
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [set(r) >= {"step", "loss", "lr", "tokens_per_s"} for r in log] == [True] * 3


def test_instruct_annotates_first_and_caches(tiny: dict[str, Path], annotated: Path, tmp_path: Path) -> None:
    direct = run(tiny, annotated, tmp_path / "direct")
    auto = run(tiny, NUMINA, tmp_path / "auto")  # no scores + --instruct: annotate, then train
    cached = list(tmp_path.glob("auto.annotated-*.jsonl"))
    assert len(cached) == 1
    assert all(torch.equal(direct[n], auto[n]) for n in direct)
    stamp = cached[0].stat().st_mtime_ns
    run(tiny, NUMINA, tmp_path / "auto", overwrite=True)
    assert cached[0].stat().st_mtime_ns == stamp  # reused, not recomputed
    record = json.loads((tmp_path / "auto" / "gift.json").read_text())
    assert record["annotations"] == str(cached[0])

    with pytest.raises(GiftMergeError, match="no scores; pass --instruct"):
        run(tiny, NUMINA, tmp_path / "none", instruct=None)


def test_authors_annotation_file_trains_as_is(tiny: dict[str, Path], annotated: Path, tmp_path: Path) -> None:
    """A file in the authors' exact output format, scored by their transcribed batch-1 code."""
    model = AutoModelForCausalLM.from_pretrained(tiny["instruct"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny["instruct"])
    lines = []
    for _, row in read_jsonl(NUMINA):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["instruction"]}], tokenize=False, add_generation_prompt=True
        )
        probs = authors_scores(model, tokenizer, prompt, row["response"], MAX_LENGTH)
        output = {"instruction": row["instruction"], "response": row["response"], "scores": [[p, p] for p in probs]}
        lines.append(json.dumps(output) + "\n")
    theirs = tmp_path / "numina_cot_24_tiny.jsonl"
    theirs.write_text("".join(lines))
    from_theirs = run(tiny, theirs, tmp_path / "theirs")
    from_ours = run(tiny, annotated, tmp_path / "ours")
    for name in from_ours:
        torch.testing.assert_close(from_theirs[name], from_ours[name], rtol=1e-4, atol=1e-6)


def test_gpt2_trains_on_its_equivalent_projections(tmp_path: Path) -> None:
    from gift_merge.toy.tiny_models import build_model

    gpt2 = build_model(tmp_path / "gpt2", "gpt2", seed=1, num_layers=2)
    family = {"base": gpt2, "instruct": gpt2}
    adapter = run(family, NUMINA, tmp_path / "out", mode="sft", grad_accum=6, warmup_ratio=0.0)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"c_attn", "c_proj", "c_fc"} and config["fan_in_fan_out"]
    assert len(adapter) == 2 * 4 * 2  # 2 layers × (c_attn, attn.c_proj, c_fc, mlp.c_proj) × (A, B)
    assert all(t.abs().max() > 0 for t in adapter.values())


def test_gradient_checkpointing_gives_the_same_adapter(tiny: dict[str, Path], annotated: Path, tmp_path: Path) -> None:
    options = {"grad_accum": 3, "warmup_ratio": 0.0}  # 2 steps, both with a learning rate
    plain = run(tiny, annotated, tmp_path / "plain", **options)
    recomputed = run(tiny, annotated, tmp_path / "recomputed", gradient_checkpointing=True, **options)
    for name in plain:
        assert plain[name].abs().max() > 0
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_yaml_train_section_with_cli_overrides(tiny: dict[str, Path], annotated: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "train.yaml"
    recipe.write_text(
        f"train:\n  base: {tiny['base']}\n  instruct: {tiny['instruct']}\n  data: {annotated}\n"
        f"  out: adapter\n  r: 4\n  alpha: 8\n  max_length: {MAX_LENGTH}\n  grad_accum: 6\n  device: cpu\n"
    )
    config = train_config_from_yaml(recipe, {"lr": 1e-3})
    assert config.out == str(tmp_path / "adapter") and config.lr == 1e-3 and config.alpha == 8.0

    result = CliRunner().invoke(main, ["--quiet", "train", "--config", str(recipe), "--targets", "q_proj,v_proj"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"] in (
        ["q_proj", "v_proj"],
        ["v_proj", "q_proj"],
    )
    again = CliRunner().invoke(main, ["train", "--config", str(recipe)])
    assert again.exit_code == 2 and "not empty (pass --overwrite" in again.output

    recipe.write_text("train:\n  base: b\n  data: d\n  out: o\n  warmup_ration: 0.1\n")
    bad = CliRunner().invoke(main, ["train", "--config", str(recipe)])
    assert bad.exit_code == 2
    assert "train.yaml: train.warmup_ration: unknown option (did you mean 'warmup_ratio'?)" in bad.output


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mode", "dpo"], "--mode: must be one of gift, sft"),
        (["--lr", "0"], "--lr: must be > 0"),
        (["--targets", "nope"], "--targets: no linear module named 'nope'"),
    ],
)
def test_cli_errors_are_one_line(
    tiny: dict[str, Path], annotated: Path, tmp_path: Path, flags: list[str], message: str
) -> None:
    args = ["train", "--base", str(tiny["base"]), "--data", str(annotated), "--out", str(tmp_path / "o"), *flags]
    result = CliRunner().invoke(main, [*args, "--device", "cpu", "--max-length", str(MAX_LENGTH)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith(f"error: {message}")


def test_drop_last_accumulation_skips_the_short_last_step(tiny: dict[str, Path], tmp_path: Path) -> None:
    """24 rows, batch 1, accumulation 5: ⌊24 / 5⌋ = 4 steps over 20 rows instead of 5 over 24.

    Both runs use the authors' Qwen prompt and the chat template's end of turn as EOS, which gift.json records.
    """
    options = {"mode": "sft", "batch_size": 1, "grad_accum": 5, "max_length": 256, "prompt_preset": "qwen25"}
    options |= {"eos_token": "chat_end"}
    run(tiny, NUMINA, tmp_path / "full", **options)
    run(tiny, NUMINA, tmp_path / "drop", drop_last_accumulation=True, **options)
    full, drop = (
        [json.loads(x) for x in (tmp_path / d / "training_log.jsonl").read_text().splitlines()]
        for d in ("full", "drop")
    )
    assert len(full) == 5 and len(drop) == 4
    lr = 1e-3  # warmup ⌈4 × 0.1⌉ = 1 step, then linear decay to 0 at step 4 (not 5)
    assert [r["lr"] for r in drop] == pytest.approx([0.0, lr, lr * 2 / 3, lr * 1 / 3], rel=1e-12)
    assert [r["tokens"] for r in drop] == [r["tokens"] for r in full[:4]]  # the same first 4 × 5 rows
    assert [r["loss"] for r in drop[:2]] == [r["loss"] for r in full[:2]]  # same weights until lrs differ

    record = json.loads((tmp_path / "drop" / "gift.json").read_text())
    assert record["steps"] == 4 and record["sequences_per_epoch"] == 20 and record["batch"]["drop_last_accumulation"]
    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    assert (record["eos_token"], record["eos_token_id"]) == (
        "<|im_end|>",
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    assert record["prompt_preset"] == "qwen25" and record["config"]["eos_token"] == "chat_end"


def test_drop_last_accumulation_resumes_and_is_part_of_the_checkpoint(
    tiny: dict[str, Path], annotated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = {"batch_size": 5, "grad_accum": 2, "drop_last_accumulation": True}  # 5 micro-batches: 2 steps
    straight = run(tiny, annotated, tmp_path / "straight", **options)

    def crash(step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    out, checkpoints = tmp_path / "resumed", tmp_path / "resumed.checkpoints"
    monkeypatch.setattr(loop_module, "_after_step", crash)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, annotated, out, save_steps=1, **options)
    monkeypatch.undo()
    assert [p.name for p in checkpoints.iterdir()] == ["step-000001"]
    with pytest.raises(GiftMergeError, match=r"was made with drop_last_accumulation=True, this run has None"):
        run(tiny, annotated, out, resume=str(checkpoints), **{**options, "drop_last_accumulation": False})
    resumed = run(tiny, annotated, out, resume=str(checkpoints), **options)
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)

    with pytest.raises(GiftMergeError, match=r"^--drop-last-accumulation: 24 sequences make 3 micro-batches, fewer"):
        run(tiny, annotated, tmp_path / "none", batch_size=8, grad_accum=4, drop_last_accumulation=True)


def test_prompt_preset_reaches_the_annotation_it_triggers(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Unscored data + --instruct + a preset: the scores are made on the preset's prompts, so they fit."""
    run(tiny, NUMINA, tmp_path / "out", prompt_preset="deepseek_math", max_length=256, grad_accum=6)
    (cached,) = tmp_path.glob("out.annotated-*.jsonl")
    record = json.loads((tmp_path / "out" / "gift.json").read_text())
    assert record["annotations"] == str(cached) and record["prompt_preset"] == "deepseek_math"
    assert record["prompt"].startswith("template: User: {instruction}\nPlease reason step by step")
    run(tiny, NUMINA, tmp_path / "chat", max_length=256, grad_accum=6)  # the chat template: other scores
    assert len(list(tmp_path.glob("chat.annotated-*.jsonl"))) == 1
    assert cached.read_text() != next(tmp_path.glob("chat.annotated-*.jsonl")).read_text()


def test_the_adapter_card_says_how_it_was_trained(llama: dict[str, Path], tmp_path: Path) -> None:
    """Not peft's empty template: the mode, the base, the data's hash, the LoRA settings and the loss."""
    import json

    from click.testing import CliRunner

    from gift_merge.cli import main

    data = Path(__file__).resolve().parents[2] / "recipes" / "data" / "numina_cot_24.jsonl"
    out = tmp_path / "adapter"
    args = ["train", "--base", str(llama["base"]), "--data", str(data), "--out", str(out), "--mode", "sft",
            "--max-length", "64", "--batch-size", "8", "--grad-accum", "1", "--r", "2"]  # fmt: skip
    result = CliRunner().invoke(main, ["-q", *args])
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    record = json.loads((out / "gift.json").read_text())
    losses = [json.loads(line)["loss"] for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert "base_model_relation: adapter" in card and "# SFT LoRA adapter" in card
    assert record["data_sha256"][:12] in card and f"trained on: `{llama['base']}`" in card
    assert f"loss {losses[0]:.4f} at the first step" in card and f"{losses[-1]:.4f} at the last" in card
