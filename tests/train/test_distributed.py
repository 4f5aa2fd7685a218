"""Two CPU processes (gloo) train the adapter one process trains with the same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gift_merge.train import TrainConfig, train
from tests.train.conftest import NUMINA, train_options
from tests.train.ranks import train_ranks


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_two_gloo_ranks_match_one_process(tiny: dict[str, Path], annotated: Path, tmp_path: Path) -> None:
    # Global batch 10 either way: 1 process × 5 sequences × 2 accumulation steps = 2 ranks × 5 × 1. The 24 rows
    # make 5 micro-batches, so the last step has one and rank 1 joins it with a zero-weight filler.
    single = train(
        TrainConfig.from_mapping(train_options(tiny, annotated, tmp_path / "single", batch_size=5, grad_accum=2)),
        quiet=True,
    )
    assert single.steps == 3

    options = train_options(tiny, annotated, tmp_path / "ddp", batch_size=5, grad_accum=1)
    rank0, rank1 = train_ranks(options, tmp_path / "ranks")
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)  # DDP kept the replicas identical
    assert (tmp_path / "ddp" / "adapter_model.safetensors").is_file()  # written once, by rank 0
    written = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    assert len(written) == len(rank0)
    for name, tensor in single.adapter.items():
        torch.testing.assert_close(rank0[name], tensor, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_two_gloo_ranks_annotate_then_train(tiny: dict[str, Path], annotated: Path, tmp_path: Path) -> None:
    """Data without scores and --instruct: both ranks score their share of the batches, rank 0 writes the
    file one process writes, and training goes on from it."""
    single = train(
        TrainConfig.from_mapping(train_options(tiny, annotated, tmp_path / "single", batch_size=5, grad_accum=2)),
        quiet=True,
    )
    options = train_options(tiny, NUMINA, tmp_path / "ddp", batch_size=5, grad_accum=1)
    rank0, _ = train_ranks(options, tmp_path / "ranks")
    cached = list(tmp_path.glob("ddp.annotated-*.jsonl"))
    assert len(cached) == 1 and cached[0].read_bytes() == annotated.read_bytes()
    assert not list(tmp_path.glob("ddp.annotated-*.shard-*"))  # joined and removed
    for name, tensor in single.adapter.items():
        torch.testing.assert_close(rank0[name], tensor, rtol=1e-4, atol=1e-6)
