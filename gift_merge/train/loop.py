"""GIFT training: a LoRA adapter on the base model, read top to bottom as setup → train → save.

A plain PyTorch loop (peft injects LoRA; no ``Trainer`` subclass). Per micro-batch the loss is the
weighted mean L = Σ w_t ℓ_t / Σ w_t over response tokens (:mod:`gift_merge.train.weights` has the
weights, :mod:`gift_merge.train.loss` the chunked head); an optimizer step's gradient is the mean of its
micro-batch losses over all micro-batches of all ranks (the authors summed them, see ``loss.py``).
Under ``torchrun`` the model is wrapped in DistributedDataParallel (or, with ``fsdp``, sharded layer by
layer with FSDP2, :mod:`gift_merge.train.sharding`) and each rank takes its share of every step's
micro-batches, so the result matches one process with the same global batch.

Everything random is seeded: LoRA's init by ``seed``, the data order by (seed, epoch), each micro-batch's
dropout by (seed, micro-batch index). That makes ``--resume`` exact and data parallelism equivalent to
accumulation, and lets a test compare adapters bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_linear_schedule_with_warmup

from gift_merge.errors import GiftMergeError
from gift_merge.io.writer import check_output_free
from gift_merge.progress import progress
from gift_merge.train import distributed, sharding
from gift_merge.train.checkpoint import load_checkpoint, save_checkpoint
from gift_merge.train.config import TrainConfig
from gift_merge.train.dataset import TrainingSet, load_training_set
from gift_merge.train.loss import micro_batch_scale, select_targets, token_coefficients, weighted_token_loss
from gift_merge.train.model import (
    Split,
    check_weights,
    enable_checkpointing,
    final_hidden,
    load_model,
    load_tokenizer,
    lora_targets,
    pad_id,
    resolve_device,
    resolve_dtype,
    split_head,
)
from gift_merge.train.output import write_adapter
from gift_merge.train.schedule import Schedule
from gift_merge.train.weights import collate

log = logging.getLogger(__name__)

# Settings a checkpoint must share with the run that resumes it; the rest (device, output, how often
# to save) may change between the two.
_RESUME_KEYS = (
    "base", "mode", "instruct", "prompt_template", "prompt_preset", "eos_token", "r", "alpha", "dropout",
    "targets", "lr", "epochs", "batch_size", "max_length", "warmup_ratio", "weight_decay", "max_grad_norm",
    "seed", "gamma", "floor", "dtype",
)  # fmt: skip


@dataclass
class TrainResult:
    """What a run produced: the folder (rank 0 only) and the trained LoRA tensors (every rank)."""

    out: Path | None  # None on ranks other than 0
    adapter: dict[str, torch.Tensor]
    steps: int
    log: list[dict[str, Any]]


class CausalLMLoss(nn.Module):
    """The model plus its GIFT loss, as one module so DistributedDataParallel sees one forward."""

    def __init__(self, model: PeftModel, split: Split) -> None:
        super().__init__()
        self.model = model
        self.split = split

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        hidden, head = final_hidden(self.model, self.split, input_ids, attention_mask)  # (B, T, H)
        rows, labels, weights = select_targets(hidden, labels, weights)  # (N, H), (N,), (N,)
        return weighted_token_loss(rows, head, labels, token_coefficients(weights))


def train(config: TrainConfig, *, quiet: bool = False) -> TrainResult:
    """Train a LoRA adapter on ``config.base`` and write it to ``config.out`` (rank 0)."""
    ranks = distributed.setup(use_cuda=torch.cuda.is_available() and not config.device.startswith("cpu"))
    try:
        device = resolve_device(config.device, ranks.local_rank if ranks.distributed else None)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the caller's RNG state is left as it was
            return _train(config, ranks, device, quiet=quiet or not ranks.is_main)
    finally:
        distributed.teardown(ranks)


def _train(config: TrainConfig, ranks: distributed.Ranks, device: torch.device, *, quiet: bool) -> TrainResult:
    # ---- setup -------------------------------------------------------------------------------------
    if ranks.is_main:
        check_output_free(config.out_path, overwrite=config.overwrite)
    dtype = resolve_dtype(config.dtype, device)
    tokenizer, base_folder = load_tokenizer(config.base)
    check_weights(base_folder)  # a damaged checkpoint fails before the data is read (load_model checks again)
    data = load_training_set(config, tokenizer, ranks, dtype, quiet=quiet)
    schedule = Schedule(
        len(data.sequences),
        config.batch_size,
        config.grad_accum,
        ranks.world,
        config.epochs,
        config.seed,
        drop_last=config.drop_last_accumulation,
    )
    if schedule.total_steps == 0:
        raise GiftMergeError(
            f"--drop-last-accumulation: {len(data.sequences)} sequences make {schedule.micro_batches_per_epoch} "
            f"micro-batches, fewer than one step of {schedule.per_step} (grad_accum × devices); without the flag "
            "they train one short step, as transformers does"
        )
    fsdp = config.fsdp and ranks.distributed
    if config.fsdp and not ranks.distributed:
        log.warning("--fsdp: a single process has nothing to shard with; training unsharded")
    # FSDP moves each layer to the device as it shards it, so the whole model need never fit there
    model = load_model(base_folder, dtype, torch.device("cpu") if fsdp else device, quiet=quiet)
    split = split_head(model)
    targets, conv1d = lora_targets(model, config.targets)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    torch.manual_seed(config.seed)  # LoRA's A init
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,  # type: ignore[arg-type]  # peft accepts float alphas
        lora_dropout=config.dropout,
        target_modules=targets,
        fan_in_fan_out=conv1d,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, lora)
    module: nn.Module = CausalLMLoss(peft_model, split)
    if fsdp:
        module = sharding.shard(module, sharding.layer_classes(model), device, ranks.world)
    elif ranks.distributed:
        module = DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)
    scheduler, warmup = lr_schedule(optimizer, schedule.total_steps, config.warmup_ratio)
    fingerprint = {k: _jsonable(getattr(config, k)) for k in _RESUME_KEYS}
    fingerprint |= {"data_sha256": data.data_sha256, "micro_batches_per_step": schedule.per_step}
    if config.drop_last_accumulation:  # only when set, so checkpoints from before the option still resume
        fingerprint["drop_last_accumulation"] = True

    records: list[dict[str, Any]] = []
    first_step = 0
    if config.resume is not None:
        state = load_checkpoint(config.resume, fingerprint, device)
        with torch.no_grad():
            for name, param in named:
                param.copy_(sharding.shard_like(state.weights[name], param))
        optimizer.load_state_dict(sharding.shard_optimizer_state(state.optimizer, params))
        scheduler.load_state_dict(state.scheduler)
        first_step, records = state.step, state.log
        log.info("resuming at step %d of %d", first_step, schedule.total_steps)

    # ---- train -------------------------------------------------------------------------------------
    pad = pad_id(tokenizer)
    peft_model.train()
    bar = progress(total=schedule.total_steps, initial=first_step, unit="step", desc="train", quiet=quiet)
    for step in range(first_step, schedule.total_steps):
        started = time.perf_counter()
        micro_batches, count = schedule.rank_micro_batches(step, ranks.rank)
        scale = micro_batch_scale(count, ranks.world)
        loss_sum, tokens = torch.zeros((), device=device), 0  # a tensor: no device sync per micro-batch
        for k, micro in enumerate(micro_batches):
            host_batch = collate([data.sequences[i] for i in micro.sequences], pad)
            batch = host_batch.to(device)
            torch.manual_seed(_micro_batch_seed(config.seed, micro.index))  # dropout masks
            last = k == len(micro_batches) - 1
            with sharding.gradient_sync(module, last):
                loss = module(batch.input_ids, batch.attention_mask, batch.labels, batch.weights)
                (loss * (0.0 if micro.filler else scale)).backward()
            if not micro.filler:
                loss_sum += loss.detach()
                tokens += host_batch.num_tokens
        grad_norm = sharding.full(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        loss_all, tokens_all = distributed.sum_over_ranks([float(loss_sum), float(tokens)], ranks, device)
        if not math.isfinite(loss_all):
            raise GiftMergeError(
                f"step {step + 1}: the loss is {loss_all / count}; the base model's weights or the data's scores "
                "hold NaN or ±inf (gift-merge run --strict on a copy merge names the tensors)"
            )
        elapsed = time.perf_counter() - started
        record = {
            "step": step + 1,
            "epoch": schedule.epoch_of(step) + 1,
            "loss": loss_all / count,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": int(tokens_all),
            "tokens_per_s": tokens_all / elapsed if elapsed > 0 else 0.0,
        }
        records.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
        _after_step(step + 1)
        if config.save_steps and (step + 1) % config.save_steps == 0 and step + 1 < schedule.total_steps:
            weights = {n: sharding.full(p.detach()) for n, p in named}  # collectives: on every rank
            optimizer_state = sharding.full_optimizer_state(optimizer.state_dict())
            if ranks.is_main:
                save_checkpoint(
                    config.checkpoint_root,
                    step=step + 1,
                    fingerprint=fingerprint,
                    weights=weights,
                    optimizer=optimizer_state,
                    scheduler=scheduler.state_dict(),
                    log=records,
                )
            distributed.barrier(ranks)
    bar.close()

    # ---- save --------------------------------------------------------------------------------------
    adapter = {n: sharding.full(p.detach()).cpu().clone() for n, p in named}  # collectives: on every rank
    out = None
    if ranks.is_main:
        provenance = _provenance(config, data, targets, schedule, warmup, dtype, ranks.world)
        out = write_adapter(
            config.out_path,
            peft_model,
            log=records,
            provenance=provenance,
            overwrite=config.overwrite,
            state_dict=adapter if fsdp else None,  # peft's own state_dict() would hold this rank's shards
        )
        shutil.rmtree(config.checkpoint_root, ignore_errors=True)
    distributed.barrier(ranks)
    return TrainResult(out=out, adapter=adapter, steps=schedule.total_steps, log=records)


def lr_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float) -> tuple[LambdaLR, int]:
    """transformers' linear schedule with ``⌈total_steps × warmup_ratio⌉`` warmup steps, and that count.

    Sized by the steps actually taken, as transformers 4.51 sized it by its own count: with
    ``--drop-last-accumulation`` the lrs are the authors' (0, 2e-4, 1.667e-4 … 3.33e-5 for their 7 steps).
    """
    warmup = math.ceil(total_steps * warmup_ratio)
    return get_linear_schedule_with_warmup(optimizer, warmup, total_steps), warmup


def _after_step(step: int) -> None:
    """Called after every optimizer step; tests replace it to interrupt a run."""


def _micro_batch_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) % (2**63)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _provenance(
    config: TrainConfig,
    data: TrainingSet,
    targets: list[str],
    schedule: Schedule,
    warmup: int,
    dtype: torch.dtype,
    world: int,
) -> dict[str, Any]:
    return {
        "method": "GIFT (Ruan et al., ACL 2026)" if config.mode == "gift" else "LoRA SFT on the base (Shadow-FT)",
        "mode": config.mode,
        "gamma": config.gamma,
        "floor": config.floor,
        "eos_weight": 1.0,
        "loss": "per micro-batch sum(w*ce)/sum(w); step gradient = mean over the step's micro-batches and ranks",
        "base_model": config.base,
        "instruct_model": config.instruct,
        "data": str(config.data),
        "data_sha256": data.data_sha256,
        "annotations": str(data.annotations) if data.annotations else None,
        "prompt": data.prompt,
        "prompt_preset": config.prompt_preset,
        "eos_token": data.eos_token,
        "eos_token_id": data.eos_id,
        "max_length": config.max_length,
        "examples": len(data.sequences),
        "skipped": data.skipped,
        "truncated": data.truncated,
        "lora": {"r": config.r, "alpha": config.alpha, "dropout": config.dropout, "targets": targets},
        "optimizer": {
            "name": "AdamW",
            "lr": config.lr,
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "weight_decay": config.weight_decay,
            "schedule": "linear",
            "warmup_ratio": config.warmup_ratio,
            "warmup_steps": warmup,
            "max_grad_norm": config.max_grad_norm,
        },
        "batch": {
            "per_device": config.batch_size,
            "grad_accum": config.grad_accum,
            "world_size": world,
            "global": config.batch_size * config.grad_accum * world,
            "drop_last_accumulation": config.drop_last_accumulation,
        },
        "epochs": config.epochs,
        "steps": schedule.total_steps,
        "sequences_per_epoch": min(
            schedule.steps_per_epoch * schedule.per_step * config.batch_size, len(data.sequences)
        ),
        "seed": config.seed,
        "dtype": str(dtype).removeprefix("torch."),
        "gradient_checkpointing": config.gradient_checkpointing,
        "config": {k: _jsonable(v) for k, v in dataclasses.asdict(config).items()},
    }
