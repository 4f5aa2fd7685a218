"""Speed and memory of GIFT annotation and training against the authors' way of computing them.

Everything runs on a randomly initialised Qwen2-shaped model (nothing is downloaded) and random token data.

Annotation:
- the authors' batch-size-1 loop: full forward, softmax over the whole vocabulary, gather;
- against :func:`gift_merge.train.annotation.score_batch` on length-sorted padded batches.

Training: the same peft LoRA (r 64, α 128, dropout 0.05 on q/k/v/o/gate/up/down), the same batches in the
same order, and the same number of AdamW steps (lr 2e-4, grad-norm clip 1.0) for three runs:
- **HF Trainer**: a ``transformers.Trainer`` subclass whose ``compute_loss`` is the authors' gift mode.
  It takes the full logits, computes fp32 cross-entropy per token, and returns Σ w·ℓ / Σ w over the
  micro-batch's response tokens, with w = clamp(max(q, 1e-4), 1e-8, 1)^γ. Their Trainer settings
  are kept: ``adamw_torch``, a linear schedule with 10 % warmup, ``logging_steps=1``, no dataloader
  workers and no pin memory. Not kept: there is no evaluation and no saving, ``report_to="none"``, and
  bf16 is on only on CUDA. Gradient accumulation is 1, so one micro-batch makes one optimizer step.
  The ASFT code that GIFT's trainer comes from calls ``model(**inputs)`` with ``labels`` still in the
  inputs, so the model also computes its own full-vocabulary loss, which is then discarded. GIFT's own
  code may or may not do the same, so this run does not, by default: that is the cheaper baseline.
  ``--trainer-model-loss`` passes ``labels`` to the model and so adds that discarded loss.
- **plain loop**: the same loss and optimizer in a bare PyTorch loop. This is what the Trainer run
  costs without the framework.
- **gift-merge**: :class:`gift_merge.train.loop.CausalLMLoss`. It puts only the hidden states of
  target rows through a chunked head, with the gradient taken inside the forward.

``Trainer`` needs ``accelerate``. peft imports ``accelerate`` itself, so it is already installed with
the project's dependencies. The ``bench`` extra (``pip install -e '.[bench]'``) pins the version that
transformers' Trainer requires. If that version is missing, the Trainer run is skipped and the others
still run.

Each run goes in its own subprocess, so its memory can be measured on its own:
- on CUDA, the peak is ``torch.cuda.max_memory_allocated`` over the timed steps;
- on every device, the child's peak RSS is reported as ``VmHWM``, which is what ``ru_maxrss`` reads.
  The peak above the child's RSS just after its imports is also reported, and the CPU memory ratios
  use that number.
``--variant`` runs one variant in the current process. That is what the parent launches for each
child.

Tokens/s counts every non-padding token, prompt and response alike, over the timed rows: the
attention-mask sum of the training batches, or the row lengths for annotation. One warm-up batch (or
step) runs before the clock starts. For the Trainer it is an extra first step on the first batch, and
the clock starts when that step ends.

    .venv/bin/python benchmarks/bench_train.py --shape tiny --steps 2 --sequences 8       # smoke test
    .venv/bin/python benchmarks/bench_train.py --shape small --device cpu                 # a CPU check
    .venv/bin/python benchmarks/bench_train.py --shape qwen0.5b --device cuda             # the issue's setting

Prints a Markdown table: tokens/s, peak GPU memory (CUDA only), peak RSS and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
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
from gift_merge.train.weights import IGNORE_INDEX, Batch, TokenSequence, build_sequence, collate

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 3, "vocab_size": 384},
    "small": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "vocab_size": 32000},
    # Qwen2-0.5B's shape: the reference numbers were measured on it.
    "qwen0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "vocab_size": 151936},
}

VARIANTS: dict[str, str] = {  # --variant name -> table row
    "annotate-authors": "annotate: authors (batch 1, full softmax)",
    "annotate-ours": "annotate: gift-merge",
    "train-trainer": "train: HF Trainer + authors' loss",
    "train-plain": "train: plain loop + authors' loss",
    "train-ours": "train: gift-merge",
}
SKIP_TRAINER = "skipped: pip install -e '.[bench]'"
GAMMA = 1.0  # the authors' focal_gamma default
LR = 2e-4


# ---- model and data ----------------------------------------------------------------------------------


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


def lora(model: Any) -> Any:
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(
        r=64, lora_alpha=128, lora_dropout=0.05, target_modules=targets, bias="none", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def training_sequences(args: argparse.Namespace) -> list[TokenSequence]:
    """``steps × batch_size`` rows (EOS appended, every response token scored 0.5), in a fixed order."""
    rows = random_data(max(args.sequences, args.steps * args.batch_size), args.max_length, vocab_size(args))
    rows = rows[: args.steps * args.batch_size]
    return [build_sequence([*ids, 2], plen, [0.5] * (len(ids) - plen), gamma=GAMMA) for ids, plen in rows]


def vocab_size(args: argparse.Namespace) -> int:
    return int(SHAPES[args.shape]["vocab_size"])


# ---- measurement -------------------------------------------------------------------------------------


def proc_status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes; 0 where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes() -> int:
    """The process's peak RSS: ``VmHWM``, or ``ru_maxrss`` (KiB on Linux) where /proc is missing."""
    hwm = proc_status_bytes("VmHWM")
    if hwm:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_clock(device: torch.device) -> float:
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return time.perf_counter()


def stop_clock(device: torch.device, start: float, result: dict[str, Any]) -> None:
    sync(device)
    result["seconds"] = time.perf_counter() - start
    if device.type == "cuda":
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1e9


@contextlib.contextmanager
def measured(device: torch.device, result: dict[str, Any]) -> Iterator[None]:
    start = start_clock(device)
    yield
    stop_clock(device, start, result)


# ---- annotation --------------------------------------------------------------------------------------


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


def run_annotation(variant: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    data = random_data(args.sequences, args.max_length, vocab_size(args))
    model = build(args.shape, device, dtype).eval()
    if variant == "annotate-authors":
        rows = data[: args.reference_rows]  # batch size 1 is slow: time a few rows

        def work(rows_used: list[tuple[list[int], int]]) -> None:
            authors_annotation(model, rows_used, device)

        warm = rows[:1]
    else:
        rows = data

        def work(rows_used: list[tuple[list[int], int]]) -> None:
            our_annotation(model, rows_used, device, args.annotate_batch)

        warm = data[:2]
    work(warm)  # warm-up (kernels, allocator)
    result: dict[str, Any] = {"rows": len(rows)}
    with measured(device, result):
        work(rows)
    result["tokens"] = sum(len(ids) for ids, _ in rows)
    return result


# ---- training ----------------------------------------------------------------------------------------


def authors_weighted_ce(logits: torch.Tensor, shift_labels: torch.Tensor, shift_weights: torch.Tensor) -> torch.Tensor:
    """``EnhancedTrainer.compute_loss`` in gift mode, after the shift: fp32 CE, weighted mean over targets.

    ``shift_labels`` / ``shift_weights`` are aligned with ``logits[..., :-1, :]`` (what position p predicts).
    """
    shift_logits = logits[..., :-1, :].contiguous().view(-1, logits.size(-1))
    labels = shift_labels.contiguous().view(-1)
    valid = labels != IGNORE_INDEX
    losses = F.cross_entropy(shift_logits.float(), labels, reduction="none", ignore_index=IGNORE_INDEX)
    weights = shift_weights.contiguous().view(-1).clamp(1e-8, 1.0) ** GAMMA
    weights = torch.where(valid, weights, torch.zeros_like(weights))
    total = weights[valid].sum()
    if total <= 1e-8:  # their fallback: an unweighted mean (a host sync, as in their code)
        return losses[valid].mean()
    return (losses * weights)[valid].sum() / total


def authors_loss(model: Any, batch: Batch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    # batch.labels is already shifted (labels[p] = ids[p + 1]); the weights sit at the same positions.
    return authors_weighted_ce(logits, batch.labels[..., :-1], batch.weights[..., :-1])


def train_steps(
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Batch], torch.Tensor],
    batches: list[Batch],
    device: torch.device,
) -> None:
    for batch in batches:
        loss = loss_fn(batch.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def run_loop(variant: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    sequences = training_sequences(args)
    batches = [collate(sequences[i : i + args.batch_size], 0) for i in range(0, len(sequences), args.batch_size)]
    peft_model = lora(build(args.shape, device, dtype)).train()
    if variant == "train-ours":
        ours = CausalLMLoss(peft_model, split_head(peft_model.get_base_model()))

        def loss_fn(b: Batch) -> torch.Tensor:
            return ours(b.input_ids, b.attention_mask, b.labels, b.weights)

    else:

        def loss_fn(b: Batch) -> torch.Tensor:
            return authors_loss(peft_model, b)

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    train_steps(params, optimizer, loss_fn, batches[:1], device)  # warm-up step
    result: dict[str, Any] = {"steps": len(batches)}
    with measured(device, result):
        train_steps(params, optimizer, loss_fn, batches, device)
    result["tokens"] = sum(b.num_tokens for b in batches)
    return result


def trainer_available() -> bool:
    """Whether transformers' Trainer can run: ``accelerate`` at the version transformers requires."""
    try:
        from transformers.utils import is_accelerate_available
    except ImportError:
        return False
    return bool(is_accelerate_available())


def trainer_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """A collated batch as the authors' collator gives it, plus their ``loss_weights``.

    Their ``labels`` are unshifted (the token at each position, -100 on prompt and padding), so that
    ``labels[..., 1:]`` lines up with ``logits[..., :-1]``. Their ``loss_weights[..., :-1]`` lines up
    with the same logits, and that is where :class:`Batch` already keeps its weights.
    """
    labels = torch.full_like(batch.labels, IGNORE_INDEX)
    labels[:, 1:] = batch.labels[:, :-1]
    return {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "labels": labels,
        "loss_weights": batch.weights,
    }


def import_trainer() -> Any:
    """transformers' Trainer classes (imported here: they pull in accelerate)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    return Trainer, TrainerCallback, TrainingArguments, PrinterCallback


def run_trainer(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    trainer_cls, callback_cls, arguments_cls, printer_cls = import_trainer()
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # accelerate puts a single process on the current CUDA device
    sequences = training_sequences(args)
    batches = [collate(sequences[i : i + args.batch_size], 0) for i in range(0, len(sequences), args.batch_size)]
    model_loss = args.trainer_model_loss

    class AuthorsTrainer(trainer_cls):  # type: ignore[misc, valid-type]
        """The authors' ``EnhancedTrainer`` in gift mode: only ``compute_loss`` is overridden."""

        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            weights = inputs.pop("loss_weights")
            labels = inputs["labels"] if model_loss else inputs.pop("labels")
            outputs = model(**inputs)
            loss = authors_weighted_ce(outputs.logits, labels[..., 1:], weights[..., :-1])
            return (loss, outputs) if return_outputs else loss

    result: dict[str, Any] = {"steps": len(batches)}
    max_steps = len(batches) + 1  # the first step is the warm-up; the clock starts when it ends

    class Clock(callback_cls):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.start = 0.0

        def on_step_end(self, _args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 1:
                self.start = start_clock(device)
            elif state.global_step == max_steps:
                stop_clock(device, self.start, result)

    collated: list[int] = []  # tokens per batch, in the order the Trainer asked for them

    def collator(items: list[TokenSequence]) -> dict[str, torch.Tensor]:
        batch = collate(items, 0)
        collated.append(batch.num_tokens)
        return trainer_inputs(batch)

    peft_model = lora(build(args.shape, device, dtype)).train()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as out:
        training_args = arguments_cls(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            max_steps=max_steps,
            learning_rate=LR,
            optim="adamw_torch",
            lr_scheduler_type="linear",
            warmup_steps=0.1,  # a ratio when below 1: the authors' warmup_ratio 0.1
            weight_decay=0.0,
            max_grad_norm=1.0,
            bf16=device.type == "cuda",
            use_cpu=device.type == "cpu",
            train_sampling_strategy="sequential",  # the plain loop's batches, in the plain loop's order
            remove_unused_columns=False,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            logging_steps=1,
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
        )
        trainer = AuthorsTrainer(
            model=peft_model,
            args=training_args,
            train_dataset=[*sequences[: args.batch_size], *sequences],  # warm-up batch, then the timed ones
            data_collator=collator,
            callbacks=[Clock()],
        )
        trainer.remove_callback(printer_cls)  # logging_steps=1 as theirs, without printing every step
        trainer.train()
    expected = [batches[0].num_tokens, *(b.num_tokens for b in batches)]
    if collated[: len(expected)] != expected:
        raise RuntimeError(f"the Trainer saw other batches than the plain loop: {collated} vs {expected}")
    result["tokens"] = sum(b.num_tokens for b in batches)
    return result


# ---- one variant in this process, or all of them in subprocesses -------------------------------------


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    if variant == "train-trainer":
        if not trainer_available():
            return {"skipped": SKIP_TRAINER}
        import_trainer()  # before the RSS baseline, so that the baseline holds the same imports' worth
    rss_start = proc_status_bytes("VmRSS")
    if variant.startswith("annotate"):
        result = run_annotation(variant, args, device, dtype)
    elif variant == "train-trainer":
        result = run_trainer(args, device, dtype)
    else:
        result = run_loop(variant, args, device, dtype)
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    result["rss_peak_gb"] = peak_rss_bytes() / 1e9
    result["rss_above_start_gb"] = (peak_rss_bytes() - rss_start) / 1e9 if rss_start else None
    return result


def launch(variant: str, argv: list[str]) -> dict[str, Any]:
    """Run ``variant`` in a child process (same arguments) and return what it measured."""
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        result_file = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--variant", variant, "--result-file", result_file]
        print(f"[bench_train] {variant} …", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, check=False)
        if done.returncode != 0 or not os.path.exists(result_file):
            return {"failed": f"failed (exit {done.returncode})"}
        with open(result_file) as f:
            result: dict[str, Any] = json.load(f)
        return result


def ratio(results: dict[str, dict[str, Any]], ours: str, other: str, key: str) -> float | None:
    a, b = results.get(ours, {}).get(key), results.get(other, {}).get(key)
    return a / b if a and b else None


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    device = torch.device(args.device)
    dtype = "bf16" if device.type == "cuda" else "fp32"
    memory_key = "peak_gpu_gb" if device.type == "cuda" else "rss_above_start_gb"
    memory_name = "peak GPU memory" if device.type == "cuda" else "peak RSS above the child's post-import RSS"
    print(
        f"\n{args.shape} on {device} ({dtype}); annotation: {args.sequences} rows (authors' loop: first "
        f"{min(args.reference_rows, args.sequences)}), batch {args.annotate_batch}; training: {args.steps} steps "
        f"× batch {args.batch_size}; rows of {args.max_length // 2}–{args.max_length} tokens\n"
    )
    print("| run | tokens/s | peak GPU GB | peak RSS GB | RSS above start GB |\n|---|---:|---:|---:|---:|")
    for variant, name in VARIANTS.items():
        if variant not in results:
            continue
        r = results[variant]
        if "skipped" in r or "failed" in r:
            print(f"| {name} | {r.get('skipped') or r.get('failed')} | – | – | – |")
            continue

        def cell(key: str, r: dict[str, Any] = r) -> str:
            return f"{r[key]:.2f}" if r.get(key) is not None else "–"

        print(
            f"| {name} | {r['tokens_per_s']:,.0f} | {cell('peak_gpu_gb')} | {cell('rss_peak_gb')} "
            f"| {cell('rss_above_start_gb')} |"
        )
    print(f"\nratios, gift-merge / other (memory: {memory_name}):\n")
    print("| comparison | speed (tokens/s) | memory |\n|---|---:|---:|")
    for ours, other in (
        ("annotate-ours", "annotate-authors"),
        ("train-ours", "train-trainer"),
        ("train-ours", "train-plain"),
    ):
        if ours not in results or other not in results:
            continue
        speed, memory = ratio(results, ours, other, "tokens_per_s"), ratio(results, ours, other, memory_key)
        status = results[other].get("skipped") or results[other].get("failed") or results[ours].get("failed")
        label = f"{VARIANTS[ours]} vs {VARIANTS[other].split(': ', 1)[1]}"
        if status:
            print(f"| {label} | {status} | – |")
        else:
            speed_cell = f"{speed:.2f}×" if speed else "–"
            memory_cell = f"{memory:.2f}×" if memory else "–"
            print(f"| {label} | {speed_cell} | {memory_cell} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-length", type=int, default=1024, help="rows are max-length/2 to max-length tokens")
    parser.add_argument("--sequences", type=int, default=32, help="annotation rows (gift-merge)")
    parser.add_argument("--reference-rows", type=int, default=8, help="annotation rows for the authors' batch-1 loop")
    parser.add_argument("--annotate-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per training run (+1 warm-up)")
    parser.add_argument("--batch-size", "--train-batch", dest="batch_size", type=int, default=4, help="training batch")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per run (0: torch's default)")
    parser.add_argument(
        "--trainer-model-loss",
        action="store_true",
        help="HF Trainer run: pass labels to the model too, as the ASFT code does (adds HF's own loss)",
    )
    parser.add_argument(
        "--only", default=",".join(VARIANTS), help=f"comma-separated variants to run (of {', '.join(VARIANTS)})"
    )
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="run one variant in this process (the children)")
    parser.add_argument("--result-file", help="with --variant: write the result here as JSON instead of printing it")
    args = parser.parse_args()
    if args.variant:
        result = run_variant(args.variant, args)
        if args.result_file:
            with open(args.result_file, "w") as f:
                json.dump(result, f)
        else:
            print(json.dumps(result, indent=1))
        return
    chosen = [v.strip() for v in args.only.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    argv = sys.argv[1:]
    results: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        if variant not in chosen:
            continue
        if variant == "train-trainer" and not trainer_available():
            results[variant] = {"skipped": SKIP_TRAINER}
            continue
        results[variant] = launch(variant, argv)
    report(args, results)


if __name__ == "__main__":
    main()
