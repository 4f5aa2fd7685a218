"""Float64 references for end-to-end checks, written plainly and independently of gift_merge.

Each function follows mergekit's documented semantics (shared/reference/mergekit-semantics.md §2)
directly, elementwise where that is clearest, so a bug in a shared kernel cannot hide in both places.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, via the safetensors library (not our reader)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensors[key] = fh.get_tensor(key)
    return tensors


def f64(t: torch.Tensor, load_dtype: torch.dtype | None = None) -> np.ndarray:
    if load_dtype is not None:
        t = t.to(load_dtype)
    return t.to(torch.float64).numpy()


def interp(anchors: list[float], t: float) -> float:
    if len(anchors) == 1:
        return anchors[0]
    x = t * (len(anchors) - 1)
    i = min(math.floor(x), len(anchors) - 1)
    f = x - i
    return (1 - f) * anchors[i] + f * anchors[min(i + 1, len(anchors) - 1)]


def linear(thetas: list[np.ndarray], weights: list[float], normalize: bool = True) -> np.ndarray:
    out = sum(w * th for w, th in zip(weights, thetas, strict=True))
    total = sum(weights)
    if normalize and abs(total) > 1e-8:
        out = out / total
    return out


def magnitude_mask(delta: np.ndarray, density: float) -> tuple[np.ndarray, np.ndarray]:
    """(keep mask, ambiguous mask): keep the ⌊ρN⌋ largest |δ|; entries tied with the k-th are ambiguous."""
    flat = np.abs(delta).ravel()
    k = int(density * flat.size)
    if density >= 1:
        return np.ones_like(delta, dtype=bool), np.zeros_like(delta, dtype=bool)
    if k == 0:
        return np.zeros_like(delta, dtype=bool), np.zeros_like(delta, dtype=bool)
    threshold = np.sort(flat)[::-1][k - 1]
    keep = np.abs(delta) > threshold
    return keep, np.abs(delta) == threshold


def ties(
    base: np.ndarray,
    thetas: list[np.ndarray],
    weights: list[float],
    densities: list[float],
    *,
    normalize: bool = True,
    lam: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """TIES with mergekit's election on weighted deltas; returns (merged, ambiguous positions)."""
    weighted, masks, ambiguous = [], [], np.zeros_like(base, dtype=bool)
    for theta, w, rho in zip(thetas, weights, densities, strict=True):
        delta = theta - base
        keep, amb = magnitude_mask(delta, rho)
        ambiguous |= amb
        weighted.append(np.where(keep | amb, delta, 0.0) * w)  # ambiguous entries are excluded from comparison
        masks.append(keep | amb)
    total = sum(weighted)
    sign = np.where(total >= 0, 1.0, -1.0)
    mixed = np.zeros_like(base)
    divisor = np.zeros_like(base)
    for wd, w in zip(weighted, weights, strict=True):
        agree = np.sign(wd) == sign
        mixed += np.where(agree, wd, 0.0)
        divisor += np.where(agree, w, 0.0)
    if normalize:
        divisor = np.where(divisor == 0, 1.0, divisor)
        mixed = mixed / divisor
    return base + lam * mixed, ambiguous


def slerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    a, b = v0.ravel(), v1.ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    ua = a / na if na > 1e-8 else a
    ub = b / nb if nb > 1e-8 else b
    dot = float(np.dot(ua, ub))
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def assert_close(actual: torch.Tensor, expected: np.ndarray, dtype: torch.dtype, name: str, skip=None) -> None:
    """Equal to the reference rounded once to ``dtype``.

    Slack: one ulp of ``dtype`` for rounding-boundary cases, plus fp32 compute error (the operators
    work in fp32; trigonometric coefficients in slerp cost a few fp32 ulps).
    """
    want = torch.from_numpy(np.ascontiguousarray(expected)).to(dtype).to(torch.float64)
    got = actual.to(torch.float64)
    assert got.shape == want.shape, name
    eps = torch.finfo(dtype).eps
    tol = 2 * eps * (want.abs() + 1e-3) + 1e-6 * (want.abs() + want.abs().mean())
    bad = (got - want).abs() > tol
    if skip is not None:
        bad &= ~torch.from_numpy(skip)
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (max {float((got - want).abs().max())})"
    )
