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


def arcee_fusion(theta: np.ndarray, base: np.ndarray, margin: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """(merged, ambiguous): θ_b + δ·[s ≥ τ] with s = |δ|·KL(softmax(θ)+1e-8 ‖ softmax(θ_b)+1e-8) per row of the
    last dimension (a vector is one row), τ = Q_½ + 1.5·(Q_¾ − Q_¼), Q_f the ⌊f·(N − 1)⌋-th smallest s.
    ``ambiguous`` marks entries whose s is within ``margin`` (relative) of τ, where a float32 run may differ.
    """
    width = base.shape[-1] if base.ndim >= 2 else base.size
    t_rows, b_rows = theta.reshape(-1, width), base.reshape(-1, width)

    def softmax(rows: np.ndarray) -> np.ndarray:
        e = np.exp(rows - rows.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p, q = softmax(t_rows) + 1e-8, softmax(b_rows) + 1e-8
    kl = np.array([sum(p[r, j] * math.log(p[r, j] / q[r, j]) for j in range(width)) for r in range(len(p))])
    score = (np.abs(t_rows - b_rows) * kl[:, None]).reshape(-1)
    ordered = np.sort(score)
    n = score.size
    q1, median, q3 = (ordered[math.floor(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    keep = (score >= threshold).reshape(base.shape)
    ambiguous = (np.abs(score - threshold) < margin * abs(threshold)).reshape(base.shape)  # none at τ = 0
    return np.where(keep, theta, base), ambiguous


def ram(
    thetas: list[np.ndarray], base: np.ndarray, epsilon: float, r: float | None = None, alpha: float | None = None
) -> np.ndarray:
    """RAM (``r`` None) or RAM+ tensor-local, entry by entry: a change |δ_i| > ε made by one model alone is kept
    (times λ_i = 1 + r·clip(S_i/max(U_i, ε), 0, α) for RAM+), one made by c > 1 models is divided by c."""
    deltas = [(th - base).reshape(-1) for th in thetas]
    n, size = len(deltas), base.size
    active = [[abs(float(d[j])) > epsilon for j in range(size)] for d in deltas]
    count = [sum(active[i][j] for i in range(n)) for j in range(size)]
    scales = [1.0] * n
    if r is not None and alpha is not None:
        for i in range(n):
            shared = sum(1 for j in range(size) if active[i][j] and count[j] > 1)
            unique = sum(1 for j in range(size) if active[i][j] and count[j] == 1)
            if unique:
                scales[i] = 1 + r * min(max(shared / max(unique, epsilon), 0.0), alpha)
    merged = np.zeros(size)
    for j in range(size):
        for i in range(n):
            if active[i][j]:
                merged[j] += deltas[i][j] * scales[i] if count[j] == 1 else deltas[i][j] / count[j]
    return base + merged.reshape(base.shape)
