"""The tiny model families must look like real checkpoints, load with transformers, and be reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from gift_merge.errors import GiftMergeError
from gift_merge.toy.tiny_models import ARCHS, build_family, build_model, build_tokenizer

MEMBERS = ("base", "instruct", "math", "code")


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, sharded or not."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", params=ARCHS)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_family(tmp_path_factory.mktemp(request.param), request.param, seed=0)


def test_family_layout(family: dict[str, Path]) -> None:
    assert set(family) == set(MEMBERS)
    for name, path in family.items():
        assert path == path.parent / name
        for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (path / f).is_file(), f"{name}/{f}"
        assert (path / "tokenizer.json").read_bytes() == (family["base"] / "tokenizer.json").read_bytes()
        assert json.loads((path / "config.json").read_text()) == json.loads(
            (family["base"] / "config.json").read_text()
        )


def test_loads_and_generates(family: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(family["base"])
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=False
    )
    enc = tok(prompt, return_tensors="pt")
    for path in family.values():
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.vocab_size == len(tok)
        out = model.generate(**enc, max_new_tokens=5, do_sample=False)
        n = enc["input_ids"].shape[1]
        assert n < out.shape[1] <= n + 5
        tok.decode(out[0, n:])


def test_sharded_index(family: dict[str, Path]) -> None:
    for path in family.values():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) >= 2
        assert not (path / "model.safetensors").exists()
        assert {p.name for p in path.glob("*.safetensors")} == shards
        assert set(_tensors(path)) == set(index["weight_map"])


def test_arch_specifics(family: dict[str, Path]) -> None:
    path = family["base"]
    config = json.loads((path / "config.json").read_text())
    names = set(_tensors(path))
    arch = config["model_type"]
    if arch == "qwen2":
        assert config["tie_word_embeddings"] is True
        assert config["layer_types"] == ["full_attention"] * config["num_hidden_layers"]
        assert "lm_head.weight" not in names
        assert "model.layers.0.self_attn.q_proj.bias" in names
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    elif arch == "llama":
        assert config["tie_word_embeddings"] is False
        assert config["num_hidden_layers"] == 3
        assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} <= names
    else:
        assert arch == "gpt2"
        assert config["n_layer"] == 3
        assert "lm_head.weight" not in names
        c_attn = _tensors(path)["transformer.h.0.attn.c_attn.weight"]
        hidden = config["n_embd"]
        assert tuple(c_attn.shape) == (hidden, 3 * hidden)  # Conv1D: (in, out)
    assert not any(torch.count_nonzero(t) == 0 for t in _tensors(path).values())


def test_fine_tunes_are_small_perturbations(family: dict[str, Path]) -> None:
    base = _tensors(family["base"])
    deltas = {}
    for name in ("instruct", "math", "code"):
        ft = _tensors(family[name])
        assert set(ft) == set(base)
        assert all(not torch.equal(ft[k], base[k]) for k in base), name
        delta = torch.cat([(ft[k] - base[k]).flatten() for k in sorted(base)])
        rel = delta.norm() / torch.cat([base[k].flatten() for k in sorted(base)]).norm()
        assert 1e-4 < rel < 0.1, (name, rel)
        deltas[name] = delta
    # Independent noise: task vectors are nearly orthogonal.
    cos = torch.nn.functional.cosine_similarity(deltas["math"], deltas["code"], dim=0)
    assert abs(cos) < 0.05


def test_tokenizer_chat_template(tmp_path: Path) -> None:
    build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert 200 <= len(tok) <= 400
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert tok.decode(tok("Zebra ünïcode 42!")["input_ids"]) == "Zebra ünïcode 42!"
    assert (tmp_path / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (tmp_path / "tokenizer_config.json").read_text()
    )


def test_deterministic_bytes(tmp_path: Path) -> None:
    state = torch.get_rng_state()
    a = _files(build_family(tmp_path / "a", "qwen2", seed=7)["base"].parent)
    b = _files(build_family(tmp_path / "b", "qwen2", seed=7)["base"].parent)
    assert torch.equal(state, torch.get_rng_state()), "building must not move the global RNG"
    assert a == b
    other = build_model(tmp_path / "c", "qwen2", seed=8, tokenizer_dir=tmp_path / "a" / "base")
    assert not torch.equal(
        _tensors(other)["model.embed_tokens.weight"],
        _tensors(tmp_path / "a" / "base")["model.embed_tokens.weight"],
    )


def test_unsharded_bf16_and_sizes(tmp_path: Path) -> None:
    path = build_model(tmp_path / "m", "llama", seed=1, num_layers=2, hidden=32, dtype=torch.bfloat16)
    assert (path / "model.safetensors").is_file()
    assert not (path / "model.safetensors.index.json").exists()
    tensors = _tensors(path)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert tensors["model.embed_tokens.weight"].shape[1] == 32
    assert not any(k.startswith("model.layers.2.") for k in tensors)
    ft = build_model(tmp_path / "ft", "llama", seed=2, dtype=torch.bfloat16, perturb_from=path)
    assert set(_tensors(ft)) == set(tensors)
    model = AutoModelForCausalLM.from_pretrained(ft)
    assert model.dtype == torch.bfloat16
    model.generate(torch.tensor([[1, 10, 20]]), max_new_tokens=5)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(GiftMergeError, match="arch"):
        build_model(tmp_path / "x", "mistral", seed=0)
    with pytest.raises(GiftMergeError, match="hidden"):
        build_model(tmp_path / "y", "llama", seed=0, hidden=30)
    base = build_model(tmp_path / "g", "gpt2", seed=0, num_layers=1, hidden=32)
    with pytest.raises(GiftMergeError, match="gpt2"):
        build_model(tmp_path / "z", "llama", seed=0, perturb_from=base)
