"""Training ranks in forked CPU processes (gloo), each started as torchrun starts one: its environment, then
the ordinary entry point. Forked, so the children inherit the imported modules (no 10 s re-import per rank).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import traceback
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gift_merge.train import TrainConfig, loop, train


class Interrupted(Exception):
    """Raised after the step a run is told to stop at, as a crash would end it."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, options: dict[str, Any], results: Path, stop: int | None) -> None:
    code = 0
    try:
        torch.set_num_threads(1)  # forked from a process that used OpenMP: stay out of its pool
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
        )
        if stop is not None:

            def crash(step: int) -> None:
                if step == stop:
                    raise Interrupted

            loop._after_step = crash  # this child's copy of the module only
        result = train(TrainConfig.from_mapping(options), quiet=True)
        save_file(result.adapter, str(results / f"rank{rank}.safetensors"))
    except Interrupted:
        pass
    except BaseException:
        (results / f"rank{rank}.error").write_text(traceback.format_exc())
        code = 1
    finally:
        os._exit(code)  # never run the parent's pytest teardown in a forked child


def train_ranks(
    options: dict[str, Any], results: Path, *, world: int = 2, stop_after: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Train with ``options`` on ``world`` ranks; each rank's ``TrainResult.adapter`` (none if stopped).

    ``stop_after``: every rank raises after that optimizer step, leaving the checkpoints written so far.
    """
    results.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("fork")
    port = _free_port()
    ranks = [
        context.Process(target=_rank_main, args=(r, world, port, options, results, stop_after)) for r in range(world)
    ]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=180)
    errors = [p.read_text() for p in results.glob("rank*.error")]
    assert not errors, errors[0]
    assert [p.exitcode for p in ranks] == [0] * world
    if stop_after is not None:
        return []
    return [load_file(str(results / f"rank{r}.safetensors")) for r in range(world)]
