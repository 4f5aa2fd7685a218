"""Tiny models with different tokenizers, for vocabulary-merge tests and the mergekit parity script.

Three word-level tokenizers share some words at different ids, each has words of its own, and added
(special) tokens overlap: the cases mergekit's ``tokenizer_source: union`` handles. A model's embedding
can be padded past its tokenizer (as Qwen2.5's is) or cut below it (so the tokenizer has ids the model
lacks, which ``base`` strips).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from gift_merge.hf_quiet import quiet_transformers
from gift_merge.toy.tiny_models import build_model, build_tokenizer

SPECIALS = ["<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
WORDS = {
    "base": ["the", "cat", "dog", "sat", "on", "mat", "a"],
    "m1": ["cat", "the", "bird", "sat", "tree"],
    "m2": ["dog", "bird", "fish", "the", "a", "mat", "on"],
}
ADDED = {
    "base": [AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)],
    "m1": [AddedToken("<|im_start|>", special=True), AddedToken("<|tool|>", special=True)],
    "m2": [AddedToken("<|tool|>", special=True, lstrip=True), AddedToken("<|m2_only|>", special=False)],
}


def build_word_tokenizer(out: Path, words: list[str], added: list[AddedToken]) -> Path:
    """A word-level tokenizer: the specials, then ``words`` in order, then ``added`` as added tokens."""
    vocab = {t: i for i, t in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    tok.add_tokens(added)
    # a pad token of its own keeps transformers' Qwen2 tokenizer from adding its default "<|endoftext|>" on load
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    with quiet_transformers(logs=True):
        fast.save_pretrained(out)
    return out


def set_rows(model: Path, rows: int, seed: int = 0) -> None:
    """Cut or pad (with seeded random rows) every vocabulary tensor of ``model`` to ``rows`` rows, and set
    its config's ``vocab_size`` to match."""
    path = model / "model.safetensors"
    tensors = load_file(str(path))
    gen = torch.Generator().manual_seed(seed)
    for name in [n for n in tensors if "embed_tokens" in n or "lm_head" in n]:
        t = tensors[name]
        extra = rows - t.shape[0]
        if extra > 0:
            t = torch.cat([t, torch.randn(extra, *t.shape[1:], generator=gen, dtype=t.dtype)])
        tensors[name] = t[:rows].contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = rows
    (model / "config.json").write_text(json.dumps(config, indent=2))


def tie(model: Path) -> None:
    """Make ``model`` a tied one: no ``lm_head.weight``, ``tie_word_embeddings`` set."""
    path = model / "model.safetensors"
    tensors = {n: t for n, t in load_file(str(path)).items() if n != "lm_head.weight"}
    save_file(tensors, str(path), metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (model / "config.json").write_text(json.dumps(config, indent=2))


def build_zoo(root: Path, arch: str = "llama", *, tied: bool = False) -> dict[str, Path]:
    """``base``, ``m1`` and ``m2``: independent tiny ``arch`` models (float32), each with its own tokenizer;
    with ``tied`` (for Llama, whose tiny models are untied) their LM heads are their embeddings."""
    paths = {}
    for i, name in enumerate(("base", "m1", "m2")):
        tok = build_word_tokenizer(root / f"tok-{name}", WORDS[name], ADDED[name])
        paths[name] = build_model(root / name, arch, seed=100 + i, num_layers=1, hidden=16, tokenizer_dir=tok)
        if tied:
            tie(paths[name])
    return paths


def build_bpe_pair(root: Path) -> dict[str, Path]:
    """``base`` and ``m1`` sharing a byte-level BPE tokenizer with two added tokens at its end, ``base``'s
    embedding cut below them (its tokenizer then has ids its model lacks, which ``base`` strips)."""
    folder = root / "tok-bpe"
    build_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_tokens([AddedToken("<|extra1|>", special=True), AddedToken("<|extra2|>")])
    tok.save(str(folder / "tokenizer.json"))
    paths = {
        name: build_model(root / f"bpe-{name}", "llama", seed=200 + i, num_layers=1, hidden=16, tokenizer_dir=folder)
        for i, name in enumerate(("base", "m1"))
    }
    set_rows(paths["base"], tok.get_vocab_size(with_added_tokens=True) - 2)
    return paths
