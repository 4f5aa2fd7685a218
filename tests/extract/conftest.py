"""Tiny bases (one per architecture) and tuned models with known low-rank deltas, built once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.extract.lowrank_models import layer_matrix, make_tuned, vector, vocab_matrix
from tests.threads import one_torch_thread

ARCHS = ("llama", "qwen2", "gpt2")
RANK = 4


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from gift_merge.toy.tiny_models import SHARD_SIZE, build_model

    root = tmp_path_factory.mktemp("extract-bases")
    return {arch: build_model(root / arch, arch, seed=11, max_shard_size=SHARD_SIZE) for arch in ARCHS}


@pytest.fixture(scope="session")
def exact(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base + an exactly rank-4 delta on every layer matrix; nothing else changed."""
    root = tmp_path_factory.mktemp("extract-exact")
    return {arch: make_tuned(base, root / arch, RANK, seed=1) for arch, base in bases.items()}


@pytest.fixture(scope="session")
def everything(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Rank-4 deltas on layer matrices and embeddings/heads, noise on every norm and bias."""
    root = tmp_path_factory.mktemp("extract-everything")

    def matrices(name: str, tensor: torch.Tensor) -> bool:
        return layer_matrix(name, tensor) or vocab_matrix(name, tensor)

    return {
        arch: make_tuned(base, root / arch, RANK, seed=2, matrices=matrices, noise=vector)
        for arch, base in bases.items()
    }


@pytest.fixture(scope="session")
def noisy_llama(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full-rank fine-tune: the base plus small Gaussian noise everywhere (a slowly decaying spectrum)."""
    from gift_merge.toy.tiny_models import build_model

    root = tmp_path_factory.mktemp("extract-noisy")
    return build_model(root / "llama", "llama", seed=12, perturb_from=bases["llama"], perturb_scale=1e-2)
