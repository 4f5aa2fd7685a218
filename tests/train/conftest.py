"""Fixtures for the GIFT trainer: one tiny Llama family, a slice of the paper's data, small configs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.threads import one_torch_thread

DATA = Path(__file__).resolve().parents[1] / "data"
# 24 short rows of the paper's numina_cot_2k.jsonl, shipped with the recipes that train on it
NUMINA = Path(__file__).resolve().parents[2] / "recipes" / "data" / "numina_cot_24.jsonl"
MAX_LENGTH = 192  # every prompt fits (≤ 144 tiny-BPE tokens), every response is cut


@pytest.fixture(scope="package", autouse=True)
def one_thread() -> Iterator[None]:
    """For the whole folder; restored when its tests are done."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="package")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``base`` and ``instruct`` tiny Llamas (ChatML template, 384-token BPE), unsharded for speed."""
    from gift_merge.toy.tiny_models import build_family

    return build_family(tmp_path_factory.mktemp("gift-train") / "llama", "llama", seed=11, sharded=False)


@pytest.fixture(scope="package")
def annotated(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """NUMINA annotated by the tiny instruct model."""
    from gift_merge.train import AnnotateConfig, annotate

    out = tmp_path_factory.mktemp("annotated") / "numina_scored.jsonl"
    return annotate(
        AnnotateConfig(
            instruct=str(tiny["instruct"]), data=str(NUMINA), out=str(out), max_length=MAX_LENGTH, device="cpu"
        ),
        quiet=True,
    )


def train_options(tiny: dict[str, Path], data: Path, out: Path, **changes: Any) -> dict[str, Any]:
    """A small, fast run: rank 4, 24 rows × ≤ 192 tokens, 3 steps of 2 micro-batches of 4."""
    options: dict[str, Any] = {
        "base": str(tiny["base"]),
        "instruct": str(tiny["instruct"]),
        "data": str(data),
        "out": str(out),
        "r": 4,
        "alpha": 8.0,
        "max_length": MAX_LENGTH,
        "batch_size": 4,
        "grad_accum": 2,
        "lr": 1e-3,
        "device": "cpu",
        "save_steps": 0,
        "seed": 5,
    }
    options.update(changes)
    return options
