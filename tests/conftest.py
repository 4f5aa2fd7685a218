"""Shared fixtures: tiny model families built once per session, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """``families[arch]["base" | "instruct" | "math" | "code"]`` for llama, qwen2 and gpt2 (sharded)."""
    from gift_merge.tiny_models import build_family

    root = tmp_path_factory.mktemp("families")
    return {arch: build_family(root / arch, arch, seed=7) for arch in ("llama", "qwen2", "gpt2")}


@pytest.fixture(scope="session")
def llama(families: dict[str, dict[str, Path]]) -> dict[str, Path]:
    return families["llama"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
