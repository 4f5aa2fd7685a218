"""Which modules get what: rank patterns, include/exclude, embeddings and undecomposable deltas."""

from __future__ import annotations

from pathlib import Path

import pytest

from gift_merge.extract import ExtractOptions, extract_lora
from tests.extract.conftest import ARCHS, RANK
from tests.extract.peft_check import adapter, load_model, logits, merged_with_peft, relative, state


def test_rank_pattern_is_honoured_by_peft(bases: dict[str, Path], exact: dict[str, Path], tmp_path: Path) -> None:
    patterns = ((r"layers\.0\.mlp\.down_proj", 1), ("mlp", 2))  # first match wins, as in peft
    opts = ExtractOptions(rank=RANK, rank_pattern=patterns, quiet=True)
    report = extract_lora(str(bases["llama"]), str(exact["llama"]), tmp_path / "a", opts)
    config, tensors, _ = adapter(tmp_path / "a")

    def want(module: str) -> int:
        return 1 if "layers.0.mlp.down_proj" in module else 2 if ".mlp." in module else RANK

    assert config["r"] == RANK
    assert config["rank_pattern"] == config["alpha_pattern"]
    assert set(config["rank_pattern"]) == {r.name for r in report.lora_rows if ".mlp." in r.name}
    for row in report.lora_rows:
        assert row.rank == row.max_rank == want(row.name)
        assert tensors[f"base_model.model.{row.name}.lora_A.weight"].shape[0] == want(row.name)
        assert row.energy_kept < 1 if want(row.name) < RANK else row.energy_kept == pytest.approx(1, abs=1e-6)

    # peft builds each module at its own rank with scale α/r = 1, so its merge is base + B·A exactly.
    merged = merged_with_peft(bases["llama"], tmp_path / "a")
    ours, base = state(merged), state(load_model(bases["llama"]))
    for row in report.lora_rows:
        A = tensors[f"base_model.model.{row.name}.lora_A.weight"].double()
        B = tensors[f"base_model.model.{row.name}.lora_B.weight"].double()
        name = f"{row.name}.weight"
        assert relative(ours[name] - base[name], B @ A) < 1e-6, row.name


def test_include_exclude_choose_modules(bases: dict[str, Path], exact: dict[str, Path], tmp_path: Path) -> None:
    opts = ExtractOptions(rank=RANK, include=(r"self_attn\.[qv]_proj",), exclude=(r"layers\.1\.",), quiet=True)
    report = extract_lora(str(bases["qwen2"]), str(exact["qwen2"]), tmp_path / "a", opts)
    config, _, _ = adapter(tmp_path / "a")
    chosen = sorted(r.name for r in report.lora_rows)
    assert chosen == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 2) for p in "qv"]
    assert config["target_modules"] == chosen  # a subset of the layers: full names, not leaf names
    merged_with_peft(bases["qwen2"], tmp_path / "a")  # no missing or unexpected keys


@pytest.mark.parametrize("arch", ARCHS)
def test_embedding_lora(arch: str, bases: dict[str, Path], everything: dict[str, Path], tmp_path: Path) -> None:
    """Embedding and head deltas as lora_embedding_A/B (and lora_A/B on Llama's untied lm_head); tied heads
    (Qwen2, GPT-2) follow their embedding through peft's in-place merge."""
    opts = ExtractOptions(rank=RANK, embeddings="lora", include=(r"\.0\.",), quiet=True)
    report = extract_lora(str(bases[arch]), str(everything[arch]), tmp_path / "a", opts)
    config, tensors, _ = adapter(tmp_path / "a")
    merged, tuned = state(merged_with_peft(bases[arch], tmp_path / "a")), state(load_model(everything[arch]))
    vocab = [n for n in tuned if any(k in n for k in ("embed_tokens", "lm_head", "wte", "wpe"))]
    assert len(vocab) == {"llama": 2, "qwen2": 2, "gpt2": 3}[arch]  # tied heads appear in state_dict too
    for name in vocab:
        assert relative(merged[name], tuned[name]) < 1e-5, name
    assert any(k.endswith("lora_embedding_A") for k in tensors)
    assert "ensure_weight_tying" not in config  # peft would then add the delta to the tied head twice
    assert {r.name for r in report.lora_rows if r.rank == RANK} >= {"model.embed_tokens", "transformer.wte"} & {
        r.name for r in report.lora_rows
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_save_embeddings_and_undecomposable(
    arch: str, bases: dict[str, Path], everything: dict[str, Path], tmp_path: Path
) -> None:
    """Embeddings saved whole (with the tied head, kept tied), norm deltas in modules_to_save, and target
    biases in lora_B.bias where peft can merge them: GPT-2, whose every target has a bias. Qwen2's o_proj
    and MLP have none, so its q/k/v bias deltas are reported dropped instead."""
    opts = ExtractOptions(rank=RANK, embeddings="save", save_undecomposable=True, quiet=True)
    report = extract_lora(str(bases[arch]), str(everything[arch]), tmp_path / "a", opts)
    config, tensors, _ = adapter(tmp_path / "a")
    assert config.get("ensure_weight_tying", False) is (arch != "llama")
    assert any("norm" in m or "ln_" in m for m in config["modules_to_save"])
    assert config["lora_bias"] is (arch == "gpt2")
    assert any(k.endswith("lora_B.bias") for k in tensors) is (arch == "gpt2")
    dropped = [r for r in report.rows if r.action == "dropped"]
    if arch == "qwen2":
        assert {r.name.rsplit(".", 2)[-2] for r in dropped} == {"q_proj", "k_proj", "v_proj"}
        assert all(r.name.endswith(".bias") and "lora_bias" in (r.reason or "") for r in dropped)
    else:
        assert not dropped

    merged, tuned = merged_with_peft(bases[arch], tmp_path / "a"), load_model(everything[arch])
    ours, want = state(merged), state(tuned)
    for name, value in want.items():
        if arch != "qwen2" or not name.endswith("_proj.bias"):
            assert relative(ours[name], value) < 1e-5, name
    if arch != "qwen2":
        assert relative(logits(merged), logits(tuned)) < 1e-5


def test_defaults_report_what_is_dropped(bases: dict[str, Path], everything: dict[str, Path], tmp_path: Path) -> None:
    report = extract_lora(
        str(bases["qwen2"]), str(everything["qwen2"]), tmp_path / "a", ExtractOptions(rank=RANK, quiet=True)
    )
    dropped = {r.name: r for r in report.rows if r.action == "dropped"}
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.bias"} <= set(dropped)
    assert all((r.relative_delta or 0) > 0 for r in dropped.values())
    assert "--embeddings skip" in dropped["model.embed_tokens.weight"].reason  # type: ignore[operator]
    assert adapter(tmp_path / "a")[0]["modules_to_save"] is None
    table = report.table()
    assert "model.norm.weight" in table and "--save-undecomposable" in table


def test_small_matrices_get_their_full_rank(bases: dict[str, Path], noisy_llama: Path, tmp_path: Path) -> None:
    """--rank 40 on 32×64 k/v projections: they get rank 32 through rank_pattern, and peft agrees."""
    opts = ExtractOptions(rank=40, include=(r"layers\.0\.self_attn",), quiet=True)
    report = extract_lora(str(bases["llama"]), str(noisy_llama), tmp_path / "a", opts)
    config, tensors, _ = adapter(tmp_path / "a")
    ranks = {r.name.rsplit(".", 1)[1]: r.rank for r in report.lora_rows}
    assert ranks == {"q_proj": 40, "k_proj": 32, "v_proj": 32, "o_proj": 40}
    assert config["r"] == 40
    assert config["rank_pattern"] == config["alpha_pattern"] == {f"model.layers.0.self_attn.{p}_proj": 32 for p in "kv"}
    full_rank = {r.name: r.energy_kept for r in report.lora_rows if r.rank == 32}
    assert all(value == pytest.approx(1.0, abs=1e-6) for value in full_rank.values())
    merged, base = state(merged_with_peft(bases["llama"], tmp_path / "a")), state(load_model(bases["llama"]))
    for row in report.lora_rows:
        A = tensors[f"base_model.model.{row.name}.lora_A.weight"].double()
        B = tensors[f"base_model.model.{row.name}.lora_B.weight"].double()
        assert relative(merged[f"{row.name}.weight"] - base[f"{row.name}.weight"], B @ A) < 1e-6, row.name


def test_unchanged_modules_are_not_saved(bases: dict[str, Path], exact: dict[str, Path], tmp_path: Path) -> None:
    """Only layer matrices changed: --embeddings save and --save-undecomposable add nothing to the adapter."""
    opts = ExtractOptions(rank=RANK, embeddings="save", save_undecomposable=True, quiet=True)
    report = extract_lora(str(bases["qwen2"]), str(exact["qwen2"]), tmp_path / "a", opts)
    config, tensors, _ = adapter(tmp_path / "a")
    assert config["modules_to_save"] is None and "ensure_weight_tying" not in config
    assert all(".lora_" in k for k in tensors)
    assert {r.action for r in report.rows} == {"lora", "unchanged"}
