"""Tiny, offline model families for tests and ``make demo``.

Merging code has to be exercised on checkpoints that look exactly like the real thing (sharded
safetensors with an index, tied and untied heads, Conv1D layouts, Qwen2's ``layer_types``), yet tests
cannot download anything and must run in seconds. This module builds such checkpoints from scratch:
a byte-level BPE tokenizer trained in-process on embedded text, and randomly initialised Llama, Qwen2
and GPT-2 models written with ``save_pretrained``, so whatever transformers writes for a real model is
what gets written here.

A *family* is a base model plus fine-tunes that are the base plus small seeded noise, which gives task
vectors of a realistic relative size. Everything is a pure function of the seed: building a family
twice gives the same bytes, which lets tests compare merge outputs byte for byte.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from gift_merge.errors import GiftMergeError
from gift_merge.hf_quiet import quiet_transformers

ARCHS: tuple[str, ...] = ("llama", "qwen2", "gpt2")
"""Architectures :func:`build_model` knows; they cover untied, tied+biased and Conv1D checkpoints."""

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>")
"""Special tokens, in id order (0–5), so every model of every family agrees on them."""

VOCAB_SIZE = 384
"""Target BPE vocabulary: the 256 byte symbols, the specials and about 120 merges."""

MAX_POSITIONS = 256
"""Context length of every tiny model; also the tokenizer's ``model_max_length``."""

SHARD_SIZE = "100KB"
"""Shard limit :func:`build_family` uses: 4–8 shards per tiny model, so index handling is tested."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, as Qwen2 and many instruct models use it, so chat-template handling meets a familiar one."""

TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
"""Files ``save_pretrained`` of a tokenizer may write; copied into model dirs, whichever exist."""

FAMILY_PERTURBATIONS: dict[str, tuple[int, float]] = {
    "instruct": (1, 1e-3),
    "math": (2, 1e-3),
    "code": (3, 1e-3),
}
"""Fine-tunes of a family: name → (seed offset, noise scale). Each differs from the base on its own."""


def _corpus() -> list[str]:
    """A few hundred sentences, generated from word lists so the file stays short.

    They mix prose, arithmetic, code and chat words so a demo prompt tokenizes into sensible pieces
    rather than single bytes.
    """
    subjects = ["the cat", "a dog", "my friend", "the model", "a small robot", "the teacher", "our team"]
    verbs = ["reads", "writes", "counts", "likes", "builds", "merges", "finds", "explains"]
    objects = ["a book", "the numbers", "some code", "two apples", "a long story", "the weights", "a sum"]
    lines = [f"{s} {v} {o}." for s in subjects for v in verbs for o in objects]
    lines += [f"What is {a} + {b}? The answer is {a + b}." for a in range(10) for b in range(10)]
    lines += [f"def add_{n}(x):\n    return x + {n}\n" for n in range(20)]
    lines += ["Hello! How can I help you today?", "You are a helpful assistant.", "Thank you, goodbye."]
    return lines


def build_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer offline and save it with ``save_pretrained`` into ``out_dir``.

    Byte-level BPE encodes any text without unknown tokens, like GPT-2/Qwen/Llama-3 tokenizers, so demo
    prompts never fail. Training is deterministic, so the saved ``tokenizer.json`` is the same bytes on
    every run. Returns the tokenizer (``len(tokenizer)`` is the model vocabulary size).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    unk, bos, eos, pad, *extra = SPECIAL_TOKENS
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=extra,
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy whichever tokenizer files ``src`` has (never weights or configs) into ``dst``."""
    found = False
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            found = found or name == "tokenizer.json"
    if not found:
        raise GiftMergeError(f"{src}: no tokenizer.json to copy into {dst}")


def _make_config(arch: str, vocab_size: int, num_layers: int, hidden: int) -> PretrainedConfig:
    """The config of a tiny ``arch`` model, shaped like the real family's (GQA, tying, biases)."""
    if hidden % 8:
        raise GiftMergeError(f"hidden={hidden}: must be a multiple of 8 (4 heads, even head_dim for RoPE)")
    if num_layers < 1:
        raise GiftMergeError(f"num_layers={num_layers}: must be at least 1")
    ids: dict[str, Any] = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    # A non-square MLP (≈2.75×, rounded to 8) catches code that confuses in/out dims.
    intermediate = (hidden * 11 // 4 + 7) // 8 * 8
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        **ids,
    }
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "qwen2":
        # Set layer_types explicitly so config.json always carries it, one entry per layer.
        return Qwen2Config(
            **common,
            tie_word_embeddings=True,
            use_sliding_window=False,
            max_window_layers=num_layers,
            layer_types=["full_attention"] * num_layers,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=MAX_POSITIONS,
            n_embd=hidden,
            n_layer=num_layers,
            n_head=4,
            tie_word_embeddings=True,
            **ids,
        )
    raise GiftMergeError(f"arch={arch!r}: unknown, expected one of {', '.join(ARCHS)}")


@torch.no_grad()
def _add_noise(model: PreTrainedModel, seed: int, scale: float, *, only_vectors: bool = False) -> None:
    """Add ``scale·randn`` (from a private generator seeded with ``seed``) to parameters, in place.

    ``named_parameters`` lists tied weights once, so tied heads stay tied. Noise is drawn in float32 and
    the sum cast back, so bf16 models get the same perturbation pattern as float32 ones.
    """
    gen = torch.Generator().manual_seed(seed)
    for _, param in model.named_parameters():
        if only_vectors and param.ndim != 1:
            continue
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        param.copy_((param.float() + scale * noise).to(param.dtype))


def build_model(
    out_dir: str | Path,
    arch: str = "llama",
    *,
    seed: int,
    num_layers: int = 3,
    hidden: int = 64,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
    perturb_from: str | Path | None = None,
    perturb_scale: float = 1e-3,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Build one tiny causal LM in ``out_dir`` exactly as ``save_pretrained`` writes a real checkpoint.

    Without ``perturb_from`` the weights are a fresh random init from ``seed``. Norm weights and biases
    also get a little noise, because the stock init (ones and zeros) would make every base share them
    exactly and make per-tensor relative comparisons divide by zero.

    With ``perturb_from`` the model is a "fine-tune": the config (arch, layers, hidden size) is that
    model's; ``num_layers`` and ``hidden`` are ignored, and the weights are its weights plus
    ``perturb_scale·randn`` seeded by ``seed``, a small task vector like a real fine-tune's.

    ``max_shard_size`` (e.g. ``"20KB"``) forces a sharded checkpoint with ``model.safetensors.index.json``;
    ``None`` writes a single ``model.safetensors``. Tokenizer files come from ``tokenizer_dir``, else from
    ``perturb_from``, else a fresh :func:`build_tokenizer` is written into ``out_dir``. Returns ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src_tok = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if src_tok is None and perturb_from is not None:
        src_tok = Path(perturb_from)
    if src_tok is None:
        vocab_size = len(build_tokenizer(out))
    else:
        _copy_tokenizer(src_tok, out)
        vocab_size = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size(with_added_tokens=True)

    with quiet_transformers():
        if perturb_from is None:
            config = _make_config(arch, vocab_size, num_layers, hidden)
            # fork_rng keeps the caller's global RNG untouched; the init itself draws from it.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            _add_noise(model, seed, 0.02, only_vectors=True)
        else:
            model = AutoModelForCausalLM.from_pretrained(perturb_from, dtype=dtype)
            got = model.config.model_type
            if got != arch:
                raise GiftMergeError(f"perturb_from={perturb_from}: is a {got!r} model, asked for {arch!r}")
            if model.config.vocab_size != vocab_size:
                raise GiftMergeError(
                    f"tokenizer_dir={src_tok}: {vocab_size} tokens, but {perturb_from} has vocab_size "
                    f"{model.config.vocab_size}"
                )
            _add_noise(model, seed, perturb_scale)
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(out, **kwargs)
    return out


def build_family(
    root: str | Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    sharded: bool = True,
    dtype: torch.dtype = torch.float32,
    num_layers: int = 3,
    hidden: int = 64,
) -> dict[str, Path]:
    """Write ``root/base`` and its fine-tunes ``root/instruct``, ``root/math``, ``root/code``.

    The fine-tunes are independent small perturbations of the base, which is the setting task-arithmetic,
    TIES and DARE merges assume. All share the base's tokenizer. With ``sharded`` every checkpoint is
    split at :data:`SHARD_SIZE`. Same arguments, same bytes. Returns ``{"base": path, ...}``.
    """
    root = Path(root)
    paths = {
        "base": build_model(
            root / "base",
            arch,
            seed=seed,
            num_layers=num_layers,
            hidden=hidden,
            dtype=dtype,
            max_shard_size=SHARD_SIZE if sharded else None,
        )
    }
    for name, (offset, scale) in FAMILY_PERTURBATIONS.items():
        # seed*1000 keeps one family's fine-tune noise from reappearing in the family of seed+1.
        paths[name] = build_model(
            root / name,
            arch,
            seed=seed * 1000 + offset,
            dtype=dtype,
            max_shard_size=SHARD_SIZE if sharded else None,
            perturb_from=paths["base"],
            perturb_scale=scale,
        )
    return paths


def build_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int,
    r: int = 4,
    alpha: int = 8,
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    scale: float = 0.02,
) -> Path:
    """A PEFT LoRA adapter on ``base_dir`` with random factors, saved by peft itself.

    peft initialises B to zero, which would make every transfer a no-op; random A and B stand in for a
    trained adapter in tests and the demo until the GIFT trainer makes a real one.
    """
    from peft import LoraConfig, get_peft_model

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        config = LoraConfig(
            r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, task_type="CAUSAL_LM"
        )
        peft_model = get_peft_model(model, config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, param in peft_model.named_parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=gen) * scale)
        peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)
