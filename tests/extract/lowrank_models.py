"""Tuned models with a known delta: base + Σ of R random rank-1 updates on chosen matrices.

Built from a tiny base checkpoint by editing its tensors and writing one ``model.safetensors`` with the
safetensors library, so the true delta of every matrix is known, and exactly rank R.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.reference import load_all

Picker = Callable[[str, torch.Tensor], bool]


def layer_matrix(name: str, tensor: torch.Tensor) -> bool:
    """The default extraction targets: 2-D weights inside the transformer layers."""
    return tensor.ndim == 2 and (".layers." in name or ".h." in name)


def vocab_matrix(name: str, tensor: torch.Tensor) -> bool:
    return tensor.ndim == 2 and any(k in name for k in ("embed_tokens", "lm_head", "wte", "wpe"))


def vector(name: str, tensor: torch.Tensor) -> bool:
    return tensor.ndim == 1


def rank_r_delta(shape: tuple[int, ...], rank: int, gen: torch.Generator) -> torch.Tensor:
    """Σ_i σ_i·u_i·v_iᵀ with unit-norm random u, v and σ_i spread over [0.05, 0.15]."""
    m, n = shape
    u = torch.randn(m, rank, generator=gen, dtype=torch.float64)
    v = torch.randn(n, rank, generator=gen, dtype=torch.float64)
    sigma = torch.linspace(0.15, 0.05, rank, dtype=torch.float64)
    return (u / u.norm(dim=0)) * sigma @ (v / v.norm(dim=0)).T


def make_tuned(
    base: Path, out: Path, rank: int, *, seed: int, matrices: Picker = layer_matrix, noise: Picker | None = None
) -> Path:
    """``out`` = ``base`` with a rank-``rank`` delta on every tensor ``matrices`` picks, and 1e-2 noise on
    those ``noise`` picks (vectors: norms and biases). Config and tokenizer are copied."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, tensor in sorted(load_all(base).items()):
        value = tensor.to(torch.float64)
        if matrices(name, tensor):
            value = value + rank_r_delta(tuple(tensor.shape), rank, gen)
        elif noise is not None and noise(name, tensor):
            value = value + 1e-2 * torch.randn(tensor.shape, generator=gen, dtype=torch.float64)
        tensors[name] = value.to(tensor.dtype).contiguous()
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for file in base.iterdir():
        if file.suffix != ".safetensors" and not file.name.endswith(".index.json"):
            shutil.copyfile(file, out / file.name)
    return out
