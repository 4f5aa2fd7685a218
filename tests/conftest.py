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
    from gift_merge.toy.tiny_models import build_family

    root = tmp_path_factory.mktemp("families")
    return {arch: build_family(root / arch, arch, seed=7) for arch in ("llama", "qwen2", "gpt2")}


@pytest.fixture(scope="session")
def llama(families: dict[str, dict[str, Path]]) -> dict[str, Path]:
    return families["llama"]


@pytest.fixture(scope="session")
def adapters(families: dict[str, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One adapter per :data:`tests.adapter_variants.VARIANTS` entry, on its family's base model."""
    from tests.adapter_variants import VARIANTS, make_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {
        name: make_adapter(families[arch]["base"], root / name, seed=i, **lora)
        for i, (name, (arch, lora)) in enumerate(VARIANTS.items())
    }


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
