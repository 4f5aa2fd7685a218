"""Speed and memory of GIFT annotation and training against the authors' way of computing them.

Two comparisons, on a randomly initialised model (nothing is downloaded) and random token data:

- annotation: the authors' batch-size-1 loop (full forward, softmax over the whole vocabulary, gather)
  against :func:`gift_merge.train.annotation.score_batch` in length-sorted padded batches;
- training: a plain loop with the authors' loss (full logits, fp32 cross-entropy, Σ w·ℓ / Σ w) against
  :class:`gift_merge.train.loop.CausalLMLoss` (hidden states of target rows only, chunked head with the
  gradient taken in the forward). Same peft LoRA (r 64 on q/k/v/o/gate/up/down), same batches.
  transformers' ``Trainer`` needs ``accelerate``, which the project does not install, so the plain loop
  with the authors' loss stands in for it: it is what their ``compute_loss`` does, without the framework.

    .venv/bin/python benchmarks/bench_train.py --shape small --device cpu          # a quick CPU check
    .venv/bin/python benchmarks/bench_train.py --shape qwen0.5b --device cuda      # the issue's setting

Prints a Markdown table: tokens/s, peak GPU memory (CUDA only) and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config

from gift_merge.train.annotation import score_batch
from gift_merge.train.loop import CausalLMLoss
from gift_merge.train.model import split_head
from gift_merge.train.weights import IGNORE_INDEX, build_sequence, collate

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 3, "vocab_size": 384},
    "small": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "vocab_size": 32000},
    # Qwen2-0.5B's shape: the reference numbers were measured on it.
    "qwen0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "vocab_size": 151936},
}


def build(shape: str, device: torch.device, dtype: torch.dtype) -> Any:
    dims = SHAPES[shape]
    heads = max(2, dims["hidden_size"] // 64)
    config = Qwen2Config(
        **dims, num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)


def random_data(n: int, max_len: int, vocab: int) -> list[tuple[list[int], int]]:
    """``(ids, prompt_len)``: lengths uniform in [max_len/2, max_len], prompts a quarter of that."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        length = int(torch.randint(max_len // 2, max_len + 1, (1,), generator=gen))
        ids = torch.randint(10, vocab, (length,), generator=gen).tolist()
        out.append((ids, length // 4))
    return out


@contextlib.contextmanager
def measured(device: torch.device, result: dict[str, float]) -> Iterator[None]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize()
        result["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    result["seconds"] = time.perf_counter() - start


@torch.inference_mode()
def authors_annotation(model: Any, data: list[tuple[list[int], int]], device: torch.device) -> None:
    for ids, prompt_len in data:
        logits = model(torch.tensor([ids], device=device)).logits[0]
        probs = torch.softmax(logits[:-1], dim=-1)  # their dtype: bf16 on GPU
        probs.gather(1, torch.tensor(ids[1:], device=device)[:, None])[prompt_len - 1 :].tolist()


def our_annotation(model: Any, data: list[tuple[list[int], int]], device: torch.device, batch: int) -> None:
    split = split_head(model)
    order = sorted(range(len(data)), key=lambda k: len(data[k][0]), reverse=True)
    for b in range(0, len(order), batch):
        spans = [(data[k][0], data[k][1] - 1) for k in order[b : b + batch]]
        score_batch(model, split, spans, 0, device)


def authors_loss(model: Any, batch: Any) -> torch.Tensor:
    """``EnhancedTrainer.compute_loss`` in gift mode: full logits, fp32 CE, Σ w·ℓ / Σ w."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    shift_logits = logits[..., :-1, :].contiguous().view(-1, logits.size(-1))
    labels = batch.labels[..., :-1].contiguous().view(-1)  # already shifted: labels[p] = ids[p + 1]
    weights = batch.weights[..., :-1].contiguous().view(-1)
    valid = labels != IGNORE_INDEX
    losses = F.cross_entropy(shift_logits.float(), labels, reduction="none", ignore_index=IGNORE_INDEX)
    return (losses * weights)[valid].sum() / weights[valid].sum()


def train_steps(model: Any, loss_fn: Callable[[Any], torch.Tensor], batches: list[Any], device: torch.device) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    for batch in batches:
        loss = loss_fn(batch.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def lora(model: Any) -> Any:
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--sequences", type=int, default=32, help="annotation rows; training uses the same rows")
    parser.add_argument("--annotate-batch", type=int, default=16)
    parser.add_argument("--train-batch", type=int, default=4)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = SHAPES[args.shape]["vocab_size"]
    data = random_data(args.sequences, args.max_length, vocab)
    rows: list[tuple[str, dict[str, float]]] = []

    model = build(args.shape, device, dtype).eval()
    reference_rows = data[:8]  # batch size 1 is slow: time a few rows
    our_annotation(model, data[:2], device, args.annotate_batch)  # warm-up (kernels, allocator)
    for name, rows_used in (
        ("annotate: authors (batch 1, full softmax)", reference_rows),
        ("annotate: gift-merge", data),
    ):
        result: dict[str, float] = {}
        with measured(device, result):
            if "gift-merge" in name:
                our_annotation(model, rows_used, device, args.annotate_batch)
            else:
                authors_annotation(model, rows_used, device)
        result["tokens_per_s"] = sum(len(ids) for ids, _ in rows_used) / result["seconds"]
        rows.append((name, result))
    model = None  # free it before training

    sequences = [build_sequence([*ids, 2], plen, [0.5] * (len(ids) - plen)) for ids, plen in data]
    batches = [collate(sequences[i : i + args.train_batch], 0) for i in range(0, len(sequences), args.train_batch)]
    train_tokens = sum(b.num_tokens for b in batches)
    for name in ("train: authors' loss, plain loop", "train: gift-merge"):
        peft_model = lora(build(args.shape, device, dtype)).train()
        ours = CausalLMLoss(peft_model, split_head(peft_model.get_base_model())) if "gift-merge" in name else None

        def loss_fn(b: Any, model: Any = peft_model, ours: Any = ours) -> torch.Tensor:
            if ours is None:
                return authors_loss(model, b)
            return ours(b.input_ids, b.attention_mask, b.labels, b.weights)

        train_steps(peft_model, loss_fn, batches[:1], device)  # warm-up
        result = {}
        with measured(device, result):
            train_steps(peft_model, loss_fn, batches, device)
        result["tokens_per_s"] = train_tokens / result["seconds"]
        rows.append((name, result))
        del peft_model

    print(f"\n{args.shape} on {device} ({dtype}), {args.sequences} rows ≤ {args.max_length} tokens\n")
    print("| run | tokens/s | peak GPU GB |\n|---|---:|---:|")
    for name, result in rows:
        peak = f"{result['peak_gb']:.2f}" if "peak_gb" in result else "–"
        print(f"| {name} | {result['tokens_per_s']:,.0f} | {peak} |")
    speed = {name: r["tokens_per_s"] for name, r in rows}
    print(f"\nannotation speed-up: {speed['annotate: gift-merge'] / speed[rows[0][0]]:.2f}×")
    print(f"training speed-up: {speed['train: gift-merge'] / speed[rows[2][0]]:.2f}×")
    if "peak_gb" in rows[2][1]:
        print(f"training peak memory: {rows[3][1]['peak_gb'] / rows[2][1]['peak_gb']:.2f}× the plain loop's")


if __name__ == "__main__":
    main()
