"""Two CPU processes (gloo) train the adapter one process trains with the same global batch."""

from __future__ import annotations

import multiprocessing
import os
import socket
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from gift_merge.train import TrainConfig, train
from tests.train.conftest import train_options


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(rank: int, port: int, options: dict[str, Any], results: Path) -> None:
    """One rank, as torchrun would start it: the launcher's environment, then the ordinary entry point."""
    code = 0
    try:
        torch.set_num_threads(1)  # forked from a process that used OpenMP: stay out of its pool
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
        )
        result = train(TrainConfig.from_mapping(options), quiet=True)
        save_file(result.adapter, str(results / f"rank{rank}.safetensors"))
    except BaseException:
        (results / f"rank{rank}.error").write_text(traceback.format_exc())
        code = 1
    finally:
        os._exit(code)  # never run the parent's pytest teardown in a forked child


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
    context = multiprocessing.get_context("fork")  # inherits the imported modules: no 10 s re-import per rank
    port = _free_port()
    ranks = [context.Process(target=_rank_main, args=(r, port, options, tmp_path)) for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
    errors = [p.read_text() for p in tmp_path.glob("rank*.error")]
    assert not errors, errors[0]
    assert [p.exitcode for p in ranks] == [0, 0]

    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2))
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)  # DDP kept the replicas identical
    assert (tmp_path / "ddp" / "adapter_model.safetensors").is_file()  # written once, by rank 0
    written = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    assert len(written) == len(rank0)
    for name, tensor in single.adapter.items():
        torch.testing.assert_close(rank0[name], tensor, rtol=1e-4, atol=1e-6)
