"""FSDP (``fsdp: true``) on two CPU processes (gloo) trains the adapter one process trains.

Each rank holds half of every weight and gathers a layer while it runs; the gradients of a step are
averaged by a reduce-scatter where DDP all-reduces. With two ranks the adapters come out bit for bit
equal (measured max |Δ| 0.0: ½·(g₀ + g₁) rounds as ½·g₀ + ½·g₁ does); other rank counts divide and sum in
another order, so the check allows float32 rounding (three ranks: 1.8e-6, DDP 1.5e-6, on weights ≤ 0.13).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gift_merge.train import TrainConfig, train
from tests.train.conftest import train_options
from tests.train.ranks import train_ranks

pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")


@pytest.fixture(scope="module")
def single(tiny: dict[str, Path], annotated: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, global batch 10 (5 sequences × 2 accumulation steps): 3 steps over the 24 rows."""
    out = tmp_path_factory.mktemp("fsdp") / "single"
    result = train(
        TrainConfig.from_mapping(train_options(tiny, annotated, out, batch_size=5, grad_accum=2)), quiet=True
    )
    assert result.steps == 3
    return out


def _assert_same_adapter(got: dict[str, torch.Tensor], folder: Path) -> None:
    expected = load_file(str(folder / "adapter_model.safetensors"))
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-6)


def test_two_fsdp_ranks_match_one_process(tiny: dict[str, Path], annotated: Path, single: Path, tmp_path: Path) -> None:
    # Global batch 10 here too: 2 ranks × 5 × 1; the last step's one micro-batch leaves rank 1 a filler.
    out = tmp_path / "fsdp"
    rank0, rank1 = train_ranks(train_options(tiny, annotated, out, batch_size=5, grad_accum=1, fsdp=True), tmp_path)
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)  # every rank gathers the same whole adapter
    written = load_file(str(out / "adapter_model.safetensors"))  # gathered, written once by rank 0
    assert all(torch.equal(written[n.replace(".default", "")], t) for n, t in rank0.items())
    _assert_same_adapter({n.replace(".default", ""): t for n, t in rank0.items()}, single)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single.iterdir())  # the same files
    config, reference = (json.loads((d / "adapter_config.json").read_text()) for d in (out, single))
    assert config == reference
    provenance = json.loads((out / "gift.json").read_text())
    assert provenance["config"]["fsdp"] is True and provenance["batch"]["world_size"] == 2


def test_fsdp_checkpoint_resumes(tiny: dict[str, Path], annotated: Path, single: Path, tmp_path: Path) -> None:
    # Checkpoints gather the sharded LoRA weights and AdamW state, and a resumed run cuts them up again;
    # activation checkpointing recomputes each sharded layer in the backward (same dropout masks, same result).
    out = tmp_path / "fsdp"
    options = train_options(
        tiny, annotated, out, batch_size=5, grad_accum=1, fsdp=True, save_steps=2, gradient_checkpointing=True
    )
    assert train_ranks(options, tmp_path / "interrupted", stop_after=3) == []  # before the adapter is written
    checkpoint = tmp_path / "fsdp.checkpoints" / "step-000002"
    assert not out.exists() and checkpoint.is_dir()
    saved = load_file(str(checkpoint / "trainable.safetensors"))
    whole = load_file(str(single / "adapter_model.safetensors"))
    assert {n.replace(".default", ""): t.shape for n, t in saved.items()} == {n: t.shape for n, t in whole.items()}
    rank0, _ = train_ranks({**options, "resume": str(checkpoint.parent)}, tmp_path / "resumed")
    _assert_same_adapter({n.replace(".default", ""): t for n, t in rank0.items()}, single)


def test_fsdp_in_one_process_trains_unsharded(
    tiny: dict[str, Path], annotated: Path, single: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The same settings work without a launcher: nothing to shard with, so it is the ordinary run, and says so.
    options = train_options(tiny, annotated, tmp_path / "out", batch_size=5, grad_accum=2, fsdp=True)
    with caplog.at_level(logging.WARNING, logger="gift_merge.train.loop"):
        result = train(TrainConfig.from_mapping(options), quiet=True)
    assert "--fsdp: a single process has nothing to shard with; training unsharded" in caplog.text
    expected = load_file(str(single / "adapter_model.safetensors"))
    assert all(torch.equal(result.adapter[n], expected[n.replace(".default", "")]) for n in result.adapter)


def test_shipped_accelerate_config_only_starts_processes() -> None:
    # accelerate reads it as a plain multi-GPU launch; the trainer's --fsdp and --dtype decide the rest
    config_args = pytest.importorskip("accelerate.commands.config.config_args")
    path = Path(__file__).resolve().parents[2] / "recipes" / "accelerate" / "multi-gpu.yaml"
    config = config_args.ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type == "MULTI_GPU" and config.mixed_precision == "no" and config.num_processes > 1
