"""Build random-weight Llama checkpoints for the merge benchmarks, offline and deterministically.

Why random weights: merge speed and memory depend only on tensor shapes, dtypes and file layout, so
there is no need to download real models (nothing can be downloaded here anyway). The models are written
tensor by tensor straight to sharded safetensors, so building even the 7B shape never holds a whole
model in memory.

Layout written under ``--out`` (default ``bench-work/models/<size>``)::

    base/       random init (normal, std 0.02; norms 1)
    instruct/   base + small perturbation   (a stand-in for an instruction-tuned model)
    ft1/, ft2/  base + other small perturbations (stand-ins for task fine-tunes)
    lora/       with --with-lora: a PEFT LoRA adapter for base (r 16, all linear projections)

Every tensor comes from its own generator seeded by (seed, model, tensor name), so the weights do not
depend on sharding or build order, and the same ``--seed`` always gives the same bytes.

Example::

    python benchmarks/make_models.py --size small --with-lora
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORK = REPO_ROOT / "bench-work"
INIT_STD = 0.02
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = ("base", "instruct", "ft1", "ft2")
MANIFEST = "bench-manifest.json"


@dataclass(frozen=True)
class Shape:
    """The Llama hyper-parameters that decide tensor shapes (and so the benchmark's cost)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int = 32000


SIZES: dict[str, Shape] = {
    # ~0.11B: quick smoke runs.
    "tiny": Shape(hidden=768, layers=8, intermediate=2048, heads=12, kv_heads=12),
    # ~0.49B, ~0.98 GB in bf16: the CPU benchmark size (two 500 MB shards per model).
    "small": Shape(hidden=1024, layers=24, intermediate=4416, heads=16, kv_heads=16),
    # ~1.5B.
    "medium": Shape(hidden=2048, layers=24, intermediate=6656, heads=32, kv_heads=32),
    # Llama-2-7B shape (6.7B); for a machine with a GPU and the disk/RAM for it, not a 2-core box.
    "7b": Shape(hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=32),
    # The 7B shape cut to 8 layers (1.9B, 3.8 GB per model): every tensor a 7B merge meets, at a quarter of
    # the build time and disk, for a GPU check that must fit a short lease (benchmarks/gpu_check.sh).
    "7b-8l": Shape(hidden=4096, layers=8, intermediate=11008, heads=32, kv_heads=32),
    # Llama-3-70B's vocabulary tensors (embedding and untied LM head of 128256 × 8192, 2.1 GB each in bf16)
    # plus one thin layer (2.3B params, 4.5 GB per model): what a 70B merge's largest tensors cost in memory
    # (issue #17), on a 2-core box. Build with --variants base,ft1,ft2.
    "70b-vocab": Shape(hidden=8192, layers=1, intermediate=512, heads=64, kv_heads=8, vocab=128256),
}


def tensor_specs(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of ``LlamaForCausalLM`` (untied lm_head), in checkpoint order."""
    h, i, kv = shape.hidden, shape.intermediate, shape.hidden // shape.heads * shape.kv_heads
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, h))]
    for layer in range(shape.layers):
        p = f"model.layers.{layer}"
        specs += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (shape.vocab, h))]
    return specs


def numel(dims: tuple[int, ...]) -> int:
    """Element count of a shape."""
    n = 1
    for d in dims:
        n *= d
    return n


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], max_bytes: int) -> list[list[str]]:
    """Group tensors into shards of at most ``max_bytes`` bf16 bytes, like ``save_pretrained`` does."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, dims in specs:
        nbytes = numel(dims) * 2
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def rng_for(seed: int, model: str, name: str) -> np.random.Generator:
    """A generator for one (seed, model, tensor): independent of build order and sharding."""
    digest = hashlib.blake2b(f"{seed}\0{model}\0{name}".encode(), digest_size=16).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))


def normal(seed: int, model: str, name: str, dims: tuple[int, ...], std: float) -> torch.Tensor:
    """fp32 N(0, std²) tensor. numpy's PCG64 is used because it is seedable per tensor and fast."""
    out = torch.from_numpy(rng_for(seed, model, name).standard_normal(numel(dims), dtype=np.float32))
    return out.mul_(std).view(dims)


def base_tensor(seed: int, name: str, dims: tuple[int, ...]) -> torch.Tensor:
    """The base model's bf16 tensor: std-0.02 normal for matrices, ones for RMSNorm weights."""
    if len(dims) == 1:
        return torch.ones(dims, dtype=torch.bfloat16)
    return normal(seed, "base", name, dims, INIT_STD).to(torch.bfloat16)


def perturbed(base: torch.Tensor, seed: int, model: str, name: str, rel: float) -> torch.Tensor:
    """``base + δ`` in bf16, with ‖δ‖/‖base‖ ≈ ``rel`` (δ Gaussian, scaled by the base tensor's RMS)."""
    rms = float(base.float().pow(2).mean().sqrt())
    delta = normal(seed, model, name, tuple(base.shape), rel * rms)
    return delta.add_(base).to(torch.bfloat16)  # add in fp32: bf16 would round small deltas away


def write_config(shape: Shape, out: Path) -> None:
    """config.json through transformers, so it carries every key the installed version expects."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        architectures=["LlamaForCausalLM"],
    )
    config.dtype = torch.bfloat16
    config.save_pretrained(out)


CORPUS_WORDS = [
    "the",
    "model",
    "merge",
    "weight",
    "tensor",
    "layer",
    "base",
    "instruct",
    "adapter",
    "task",
    "vector",
    "sum",
    "add",
    "scale",
    "sign",
    "mask",
    "drop",
    "keep",
    "trim",
    "elect",
    "mean",
    "norm",
    "shard",
    "read",
    "write",
    "token",
    "answer",
    "question",
    "step",
    "result",
    "number",
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "plus",
    "minus",
    "times",
    "equals",
    "because",
    "so",
    "then",
    "first",
    "next",
]


def build_tokenizer(out: Path) -> None:
    """A small byte-level BPE (~1k tokens) trained on seeded synthetic text; needs no download.

    The merge tools only copy tokenizer files, so its quality is irrelevant; it just has to load with
    ``AutoTokenizer``. Token ids stay below the model's 32000-row embedding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = np.random.Generator(np.random.PCG64(1234))
    lines = []
    for _ in range(4000):
        words = rng.choice(CORPUS_WORDS, size=int(rng.integers(4, 16)))
        lines.append(" ".join(words) + f" {int(rng.integers(0, 1000))}+{int(rng.integers(0, 1000))}.")
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|eot|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    fast.save_pretrained(out)
    # Name the class every transformers version knows (v5 writes its new "TokenizersBackend").
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("backend", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def write_model(
    shards: list[list[str]],
    dims_of: dict[str, tuple[int, ...]],
    seed: int,
    rel: float,
    out_root: Path,
    variants: tuple[str, ...] = VARIANTS,
) -> None:
    """Write the variants shard by shard: only one base shard and one variant shard are resident."""
    n = len(shards)
    weight_maps: dict[str, dict[str, str]] = {v: {} for v in variants}
    total_bytes = 0
    for idx, names in enumerate(shards, start=1):
        fname = f"model-{idx:05d}-of-{n:05d}.safetensors"
        base = {name: base_tensor(seed, name, dims_of[name]) for name in names}
        total_bytes += sum(t.numel() * t.element_size() for t in base.values())
        for variant in variants:
            tensors = (
                base
                if variant == "base"
                else {name: perturbed(t, seed, variant, name, rel) for name, t in base.items()}
            )
            save_file(tensors, str(out_root / variant / fname), metadata={"format": "pt"})
            weight_maps[variant].update(dict.fromkeys(names, fname))
            del tensors
        print(f"  shard {idx}/{n} written for {', '.join(variants)}", flush=True)
    for variant in variants:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_maps[variant]}
        (out_root / variant / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_lora(shape: Shape, seed: int, rank: int, rel: float, out: Path, base_dir: Path) -> None:
    """A PEFT LoRA adapter with random A and B (PEFT zero-inits B; here ΔW must be non-zero).

    Scales are chosen so that each ΔW = (α/r)·B·A has an element RMS of ``rel`` × the weight's 0.02.
    """
    alpha = 2 * rank
    scale = alpha / rank
    kv = shape.hidden // shape.heads * shape.kv_heads
    io = {  # module -> (in_features, out_features)
        "q_proj": (shape.hidden, shape.hidden),
        "k_proj": (shape.hidden, kv),
        "v_proj": (shape.hidden, kv),
        "o_proj": (shape.hidden, shape.hidden),
        "gate_proj": (shape.hidden, shape.intermediate),
        "up_proj": (shape.hidden, shape.intermediate),
        "down_proj": (shape.intermediate, shape.hidden),
    }
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(shape.layers):
        for mod in LORA_TARGETS:
            parent = "self_attn" if mod in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{parent}.{mod}"
            fan_in, fan_out = io[mod]
            std_a = fan_in**-0.5
            # RMS(ΔW) = scale · sqrt(r) · std_a · std_b  ->  solve for std_b.
            std_b = rel * INIT_STD / (scale * rank**0.5 * std_a)
            tensors[f"{key}.lora_A.weight"] = normal(seed, "lora_A", key, (rank, fan_in), std_a)
            tensors[f"{key}.lora_B.weight"] = normal(seed, "lora_B", key, (fan_out, rank), std_b)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(LORA_TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    try:  # let the installed peft fill in its full key set (and peft_version), if it is there
        from peft import LoraConfig

        full = LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"}).to_dict()
        config = json.loads(json.dumps(full, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    except ImportError:
        pass
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def build(
    size: str,
    out_root: Path,
    seed: int,
    rel: float,
    max_shard_mb: int,
    lora_rank: int | None,
    variants: tuple[str, ...] = VARIANTS,
) -> None:
    """Build (or rebuild) the variants of one size into ``out_root``."""
    shape = SIZES[size]
    specs = tensor_specs(shape)
    dims_of = dict(specs)
    n_params = sum(numel(d) for _, d in specs)
    manifest = {
        "size": size,
        "shape": asdict(shape),
        "params": n_params,
        "seed": seed,
        "rel_perturbation": rel,
        "max_shard_bytes": max_shard_mb * 1000**2,
        "lora_rank": lora_rank,
        "variants": list(variants),
        "builder": "benchmarks/make_models.py",
    }
    manifest_path = out_root / MANIFEST
    if manifest_path.exists() and json.loads(manifest_path.read_text()) == manifest:
        print(f"{out_root}: already built with these settings; use --force to rebuild")
        return
    for variant in (*VARIANTS, "lora"):
        shutil.rmtree(out_root / variant, ignore_errors=True)
    manifest_path.unlink(missing_ok=True)

    print(f"building {size}: {n_params / 1e9:.3f}B params, {n_params * 2 / 1e9:.2f} GB per model (bf16)")
    t0 = time.perf_counter()
    for variant in variants:
        (out_root / variant).mkdir(parents=True)
        write_config(shape, out_root / variant)
    build_tokenizer(out_root / "base")
    shards = plan_shards(specs, max_shard_mb * 1000**2)
    write_model(shards, dims_of, seed, rel, out_root, variants)
    for variant in variants[1:]:  # same tokenizer everywhere, as for a real model family
        for f in (out_root / "base").iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy2(f, out_root / variant / f.name)
    if lora_rank is not None:
        write_lora(shape, seed, lora_rank, rel, out_root / "lora", (out_root / "base").resolve())
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"done in {time.perf_counter() - t0:.1f} s -> {out_root}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--out", type=Path, help="output folder (default bench-work/models/SIZE)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rel-perturbation",
        type=float,
        default=1e-2,
        help="‖δ‖/‖W‖ of the instruct/ft perturbations and of the LoRA delta",
    )
    parser.add_argument("--max-shard-mb", type=int, default=500, help="shard size cap, in MB (10^6 bytes)")
    parser.add_argument("--with-lora", action="store_true", help="also write a PEFT LoRA adapter (lora/)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="models to write (base is always written); e.g. base,ft1,ft2 to save disk at 7b (13.5 GB each)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the manifest matches")
    args = parser.parse_args(argv)

    wanted = {v.strip() for v in args.variants.split(",") if v.strip()}
    if unknown := wanted - set(VARIANTS):
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {VARIANTS}")
    variants = tuple(v for v in VARIANTS if v in wanted | {"base"})  # base first: the others derive from it
    out_root: Path = args.out or DEFAULT_WORK / "models" / args.size
    if args.force:
        (out_root / MANIFEST).unlink(missing_ok=True)
    out_root.mkdir(parents=True, exist_ok=True)
    build(
        args.size,
        out_root,
        args.seed,
        args.rel_perturbation,
        args.max_shard_mb,
        args.lora_rank if args.with_lora else None,
        variants,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
