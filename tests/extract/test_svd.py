"""The truncated SVD against float64 references: exact ranks, energies, the randomized path's accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gift_merge.extract import ExtractOptions, extract_lora
from gift_merge.extract.svd import truncated_svd
from tests.extract.peft_check import adapter
from tests.reference import load_all


def spectrum_matrix(m: int, n: int, spectrum: np.ndarray, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, len(spectrum))))
    v, _ = np.linalg.qr(rng.standard_normal((n, len(spectrum))))
    return torch.from_numpy((u * spectrum) @ v.T).float()


def reference_energy(delta: torch.Tensor, k: int) -> float:
    s = np.linalg.svd(delta.double().numpy(), compute_uv=False)
    return float((s[:k] ** 2).sum() / (s**2).sum())


@pytest.mark.parametrize("method", ["auto", "full", "randomized"])
@pytest.mark.parametrize("shape", [(96, 200), (200, 96), (40, 40)])
def test_exact_low_rank_is_recovered(method: str, shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(shape[0], 3, generator=gen) @ torch.randn(3, shape[1], generator=gen)
    f = truncated_svd(delta, 8, name="w", method=method)
    assert f.rank == 3
    assert float((f.B @ f.A - delta).norm() / delta.norm()) < 1e-5
    assert f.energy_fraction == pytest.approx(1.0, abs=1e-6)
    # Distributed scale: A = √S·Vh and B = U·√S have equal row/column norms.
    assert torch.allclose(f.A.norm(dim=1), f.B.norm(dim=0), rtol=1e-4)


@pytest.mark.parametrize(
    "name, spectrum",
    [
        ("flat", np.ones(160)),
        ("power-law", np.arange(1, 161) ** -0.5),
        ("exponential", np.exp(-np.arange(160) / 10)),
        ("steps", np.where(np.arange(160) < 12, 1.0, 0.3)),
    ],
)
def test_kept_energy_matches_float64_svd(name: str, spectrum: np.ndarray) -> None:
    delta = spectrum_matrix(160, 320, spectrum, seed=1)
    for k in (4, 16):
        f = truncated_svd(delta, k, name=name)
        want = reference_energy(delta, k)
        assert f.rank == k
        assert f.energy_fraction == pytest.approx(want, rel=1e-3), (name, k, f.method)
        # The reported fraction is what the factors really keep: 1 − ‖Δ − BA‖² / ‖Δ‖².
        residual = float(((delta.double() - (f.B @ f.A).double()) ** 2).sum() / (delta.double() ** 2).sum())
        assert 1 - residual == pytest.approx(f.energy_fraction, abs=1e-5)


def test_zero_delta_has_rank_zero() -> None:
    f = truncated_svd(torch.zeros(8, 5), 4, name="w")
    assert (f.rank, f.method, f.energy_fraction) == (0, "zero", 1.0)


def test_extracted_energies_match_float64_reference(bases: dict[str, Path], noisy_llama: Path, tmp_path: Path) -> None:
    """A full-rank (noise) fine-tune: every module's reported energy is the optimal rank-8 fraction."""
    report = extract_lora(str(bases["llama"]), str(noisy_llama), tmp_path / "a", ExtractOptions(rank=8, quiet=True))
    base, tuned = load_all(bases["llama"]), load_all(noisy_llama)
    methods = set()
    for row in report.lora_rows:
        delta = tuned[f"{row.name}.weight"].double() - base[f"{row.name}.weight"].double()
        assert row.rank == 8
        assert row.energy_kept == pytest.approx(reference_energy(delta, 8), rel=1e-3), row.name
        methods.add(row.svd)
    assert methods == {"full", "randomized"}  # 64×64 → randomized; 32×64 → too small for it
    total = sum(r.delta_energy or 0 for r in report.lora_rows)
    assert adapter(tmp_path / "a")[2]["energy_kept"] == pytest.approx(
        sum((r.delta_energy or 0) * (r.energy_kept or 0) for r in report.lora_rows) / total
    )
