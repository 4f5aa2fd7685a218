"""Tensor kernels shared by the merge operators.

Every piece of math that more than one operator needs lives here once: task vectors, the three pruning
masks (magnitude, random, breadcrumbs) and DELLA's keep probabilities, the L1-norm-match rescale, TIES sign
election and the disjoint mean, and the two spherical interpolations. Operators compose these; they never
re-derive them.

Conventions:
- Masks are ``bool`` tensors of the delta's shape.
- Selections are total orders: ties in magnitude go to the lower flat index, so a mask does not depend on
  the device or on how a sort happens to break ties.
- Random numbers come only from the caller's CPU generator, one :func:`uniform_like` of the tensor's shape
  per call, moved to the tensor's device afterwards: the same seed gives the same mask on every device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from gift_merge.lazy import torch

RESCALE_EPS = 1e-7
"""Below this L1 norm (before or after masking) the rescale is skipped, as in mergekit."""


def task_vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    """δ_i = θ_i − θ_b for each input, in input order."""
    return [t - base for t in tensors]


# --------------------------------------------------------------------------------------------- reductions
# Inner products go through ``Tensor.sum``, never ``torch.dot`` or ``torch.linalg.vector_norm``: on the CPU
# those accumulate float32 sequentially and were measured 0.07 % (dot) to 0.5 % (L2 norm) off on a 16M-entry
# tensor, while ``sum`` uses cascade summation and stays within ~1e-7.


REDUCE_BLOCK = 1 << 16
"""Entries per block of a whole-tensor inner product (see :func:`flat_dot`)."""


def block_total(x: Any) -> float:
    """Σ x of one block (or any tensor or array), as a Python float.

    On the CPU this is numpy's pairwise sum (:func:`array_total`) for torch tensors and numpy arrays
    alike, so whole-tensor statistics do not depend on the engine; on other devices ``Tensor.sum``.
    """
    if isinstance(x, np.ndarray):
        return array_total(x)
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return array_total(x.detach().contiguous().numpy())
    return float(x.sum())


def array_total(x: np.ndarray) -> float:
    """Σ x over all entries in x's own dtype: numpy's pairwise summation (the CPU's one block sum)."""
    return float(np.add.reduce(x, axis=None))


def flat_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """⟨a, b⟩ over all entries: the sum of each 65,536-entry block of a·b (:func:`block_total`), added in
    float64.

    Why blocks: a streaming operator meets the same blocks one slice at a time and so gets the same bits
    as the whole-tensor path, and the float64 total keeps the rounding error at one block's.
    """
    fa, fb = a.reshape(-1), b.reshape(-1)
    total = 0.0
    for start in range(0, fa.numel(), REDUCE_BLOCK):
        part = slice(start, start + REDUCE_BLOCK)
        total += block_total(fa[part] * fb[part])
    return total


def blocked_sum(x: Any) -> float:
    """Σ x over all entries of a tensor or array, summed as :func:`flat_dot` sums: blocks, added in float64.

    The L1 norms of the rescale go through here, so a streamed pass that meets the blocks one slice at
    a time (and never holds |δ| whole) gets the same factor as the whole-tensor path, in either engine.
    """
    flat = x.reshape(-1)
    total = 0.0
    for start in range(0, len(flat), REDUCE_BLOCK):
        total += block_total(flat[start : start + REDUCE_BLOCK])
    return total


def flat_norm(a: torch.Tensor) -> float:
    """‖a‖₂ over all entries."""
    return math.sqrt(flat_dot(a, a))


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨a, b⟩ along the last dimension, keeping it: shape (..., 1). On the CPU numpy's pairwise sums
    (:func:`array_row_dot`), as in the numpy engine."""
    product = a * b
    if product.device.type == "cpu" and product.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(array_row_dot(product.numpy()))
    return product.sum(dim=-1, keepdim=True)


def array_row_dot(product: np.ndarray) -> np.ndarray:
    """Row sums of an elementwise product along the last axis, keeping it."""
    return np.add.reduce(product, axis=-1, keepdims=True)


def row_norm(a: torch.Tensor) -> torch.Tensor:
    """‖a‖₂ along the last dimension, keeping it: shape (..., 1).

    On the CPU the square root is numpy's too: torch's float32 ``sqrt`` there is not correctly rounded
    (measured: one result in five is 1 ulp off), numpy's is.
    """
    if a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(array_row_norm(a.detach().numpy()))
    return row_dot(a, a).sqrt()


def array_row_norm(a: np.ndarray) -> np.ndarray:
    """:func:`row_norm` in numpy."""
    return np.sqrt(array_row_dot(a * a))


# --------------------------------------------------------------------------------------------- selection


def kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a 1-D tensor, as a 0-d tensor on its device.

    A selection, never a sort. On the CPU :func:`kth_largest_array` (numpy) is about 10× faster than
    ``torch.kthvalue``; both return the same value, so the mask built from it is the same on every device.
    """
    n = flat.numel()
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        return torch.tensor(kth_largest_array(flat.detach().numpy(), k), dtype=flat.dtype)
    return torch.kthvalue(flat, n - k + 1).values


_SAMPLE = 1 << 16
"""Entries of the strided sample that guesses the k-th largest value."""
_GUESS_FROM = 1 << 20
"""Below this size introselect is fast enough."""


def kth_largest_array(values: np.ndarray, k: int, *, in_place: bool = False) -> Any:
    """The k-th largest entry of a 1-D array (1 ≤ k ≤ n), exactly; ``in_place`` may reorder ``values``."""
    return kth_largest_and_count(values, k, in_place=in_place)[0]


def kth_largest_and_count(values: np.ndarray, k: int, *, in_place: bool = False) -> tuple[Any, int]:
    """The k-th largest entry v of a 1-D array (1 ≤ k ≤ n) and how many entries exceed it.

    Why not just ``np.partition``: task vectors of bf16 checkpoints repeat few values (a 4.5M-entry |δ| had
    7,066 distinct ones), which makes introselect crawl (~8 ns per entry), while a guess from a strided
    sample usually *is* the answer and two counting passes (~1 ns per entry) prove it. When the guess
    misses, only the entries between it and a second sample value are selected among; when the sample
    cannot bracket the answer (or there are NaNs, which order differently), it falls back to introselect.
    The count comes free from the counting passes; TIES needs it to resolve ties at the cut.
    """
    n = values.size
    if n >= _GUESS_FROM:
        found = _sampled_kth_largest(values, k)
        if found is not None:
            return found
    if in_place:
        values.partition(n - k)
        value = values[n - k]
    else:
        value = np.partition(values, n - k)[n - k]
    return value, int(np.count_nonzero(values > value))


def _sampled_kth_largest(values: np.ndarray, k: int) -> tuple[Any, int] | None:
    n = values.size
    if not math.isfinite(float(values.sum())):  # NaNs: introselect ranks them above everything
        return None
    sample = np.sort(values[:: max(1, n // _SAMPLE)])
    m = sample.size
    margin = 4 * int(math.sqrt(m)) + 8
    at = min(max(int(m - k * m / n), 0), m - 1)
    guess = sample[at]
    above = int(np.count_nonzero(values > guess))  # the answer v satisfies count(> v) < k ≤ count(≥ v)
    if above < k:
        equal = int(np.count_nonzero(values == guess))
        if above + equal >= k:
            return guess, above
        # the answer is below the guess: select among [lower, guess)
        between = values < guess
        if at - margin > 0:
            between &= values >= sample[at - margin]
        candidates = values[between]
        above_candidates = above + equal
    else:
        # the answer is above the guess: select among (guess, upper]
        if at + margin < m - 1:
            upper = sample[at + margin]
            above_candidates = int(np.count_nonzero(values > upper))
            if above_candidates >= k:
                return None
            candidates = values[(values > guess) & (values <= upper)]
        else:
            above_candidates = 0
            candidates = values[values > guess]
    need = k - above_candidates
    if need > candidates.size:
        return None
    candidates.partition(candidates.size - need)
    value = candidates[candidates.size - need]
    return value, above_candidates + int(np.count_nonzero(candidates > value))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` largest entries of ``scores`` (any shape, ranked over all entries).

    A selection (:func:`kth_largest_and_count`), never a full sort. Entries equal to the k-th largest value
    are kept in flat-index order until ``k`` are kept, so the result is the prefix of the total order
    (value descending, index ascending): deterministic, and ``topk_mask(s, a) ⊆ topk_mask(s, b)`` for a ≤ b.
    ``k ≤ 0`` gives an all-false mask.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    threshold, above = cut_of(flat, k)
    return cut_mask(flat, threshold, above, k).view(scores.shape)


def cut_of(flat: torch.Tensor, k: int, *, in_place: bool = False) -> tuple[torch.Tensor, int]:
    """The k-th largest entry of a 1-D tensor (0-d, on its device) and how many entries exceed it.

    ``in_place`` lets the CPU selection reorder ``flat`` when the caller no longer needs its order.
    """
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        value, above = kth_largest_and_count(flat.detach().numpy(), k, in_place=in_place)
        return torch.tensor(value, dtype=flat.dtype), above
    threshold = kth_largest(flat, k)
    return threshold, int(torch.count_nonzero(flat > threshold))


def cut_mask(flat: torch.Tensor, threshold: torch.Tensor, above: int, k: int) -> torch.Tensor:
    """The entries above ``threshold`` plus, in index order, the first ``k − above`` equal to it."""
    mask = flat > threshold
    if above == k:  # no tie crosses the cut
        return mask
    # Ties cross the cut (common in bf16 checkpoints, whose deltas repeat values). nonzero lists the tied
    # positions in order, far cheaper than an int64 cumsum over the whole tensor.
    need = k - above
    equal = flat == threshold
    if equal.device.type == "cpu":  # numpy's flatnonzero is ~5× faster than torch.nonzero on the CPU
        tied = torch.from_numpy(np.flatnonzero(equal.numpy())[:need])
    else:
        tied = torch.nonzero(equal).squeeze(1)[:need]
    mask[tied] = True
    return mask


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the k = ⌊ρ·N⌋ entries of largest |δ|; k = 0 keeps nothing."""
    return topk_mask(delta.abs(), int(density * delta.numel()))


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the γ-fraction of largest |δ|, then keep the next ⌊ρ·N⌋ entries.

    With n_top = ⌊γN⌋ and target = ⌊ρN⌋, the kept entries are those of magnitude rank (0 = largest) in
    [n_top, n_top + target). When n_top + target > N, fewer outliers are dropped so that target entries
    stay, exactly as mergekit does. mergekit's slice ``[n_bot:-n_top]`` is empty when n_top = 0 (γ = 0,
    or N < 1/γ) and zeroes the whole delta; here n_top = 0 simply means plain magnitude top-k.
    """
    n = delta.numel()
    target = int(density * n)
    n_top = min(int(gamma * n), n - target)
    magnitude = delta.abs()
    return topk_mask(magnitude, n_top + target) & ~topk_mask(magnitude, n_top)


# --------------------------------------------------------------------------------------------- randomness


def _bits_of(generator: np.random.Generator | None) -> Any:
    if generator is None:
        raise ValueError("a random merge operator needs MergeInputs.generator (see generator_for)")
    return generator.bit_generator


def _raw_draws(generator: np.random.Generator | None, count: int) -> np.ndarray:
    """``count`` uint32 draws: the 32-bit halves (low first) of the generator's raw 64-bit outputs."""
    return _bits_of(generator).random_raw((count + 1) // 2).view(np.uint32)[:count]


def skip_draws(generator: np.random.Generator | None, count: int) -> None:
    """Advance ``generator`` exactly as ``count`` draws would (a model that keeps everything still uses up
    its draw, so later models' masks do not move), without making them."""
    _bits_of(generator).advance((count + 1) // 2)  # generator_for's PCG64DXSM can jump ahead


def uniform_floats(generator: np.random.Generator | None, count: int) -> torch.Tensor:
    """``count`` float32 draws from U[0, 1) on the CPU: :func:`uniform_array` as a tensor."""
    return torch.from_numpy(uniform_array(generator, count))


def uniform_array(generator: np.random.Generator | None, count: int) -> np.ndarray:
    """``count`` float32 draws from U[0, 1): the top 24 bits of each raw 32-bit draw, times 2⁻²⁴, so every
    value is exact in float32 (as ``torch.rand``'s).

    Reading raw bits is 2× faster than ``Generator.random`` and 4× faster than ``torch.rand``.
    """
    uniform = (_raw_draws(generator, count) >> np.uint32(8)).astype(np.float32)
    uniform *= np.float32(2.0**-24)
    return uniform


def random_keep(generator: np.random.Generator | None, count: int, density: float) -> torch.Tensor:
    """``count`` Bernoulli(ρ) draws as a bool tensor: :func:`random_keep_array`."""
    return torch.from_numpy(random_keep_array(generator, count, density))


def random_keep_array(generator: np.random.Generator | None, count: int, density: float) -> np.ndarray:
    """``count`` Bernoulli(ρ) draws: u < ρ for the :func:`uniform_array` u, decided on the raw bits (top 24
    bits < ⌈ρ·2²⁴⌉), which skips the float conversion and is exactly the same test."""
    bits = _raw_draws(generator, count)
    limit = math.ceil(density * 2**24)
    if limit <= 0:
        return np.zeros(count, dtype=bool)
    if limit >= 2**24:
        return np.ones(count, dtype=bool)
    return bits <= np.uint32(limit * 256 - 1)


def uniform_like(tensor: torch.Tensor, generator: np.random.Generator | None) -> torch.Tensor:
    """U[0, 1) of ``tensor``'s shape from :func:`uniform_floats`, moved to its device.

    Drawing on the CPU keeps masks identical across devices; float32 so the draw does not depend on the
    compute dtype.
    """
    return uniform_floats(generator, tensor.numel()).view(tensor.shape).to(tensor.device)


def random_drop_mask(delta: torch.Tensor, density: float, generator: np.random.Generator | None) -> torch.Tensor:
    """DARE: keep each entry independently with probability ρ (m ~ Bernoulli(ρ), as u < ρ; see :func:`random_keep`).

    The draw happens even when ρ ≥ 1 so that every model consumes the same amount of the
    generator: one model's density never changes another model's mask.
    """
    return random_keep(generator, delta.numel(), density).view(delta.shape).to(delta.device)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """2-D view whose rows are the slices along the last dimension; a vector is one row."""
    if tensor.dim() < 2:
        return tensor.reshape(1, -1)
    return tensor.reshape(-1, tensor.shape[-1])


DELLA_BLOCK = 1 << 18  # entries ranked at once by della_keep_probabilities


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune: p = (ρ − ε) + 2ε·r̃, with r̃ ∈ [0, 1] the |δ| rank within its row.

    Rows are slices along the last dimension (a vector is one row). Ranks are 0..n−1 by ascending |δ|
    (stable: equal magnitudes rank by index), r̃ = rank/(n − 1). A one-element row, where mergekit's
    (rank − min)/(max − min) is 0/0, gets r̃ = ½, i.e. p = ρ.
    """
    rows = _rows(delta)
    probs = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
    for part, block in _della_row_blocks(rows, density, epsilon):
        probs[part] = block
    return probs.reshape(delta.shape)


def della_keep_mask(
    delta: torch.Tensor, density: float, epsilon: float, generator: np.random.Generator | None
) -> torch.Tensor:
    """m ~ Bernoulli(p) for :func:`della_keep_probabilities`' p, as u < p with the :func:`uniform_like`
    draws, a block of rows at a time: the same mask as ``uniform_like(p) < p`` over the whole tensor
    (blocks of an even number of entries take the same raw draws in the same order), without the two
    tensor-sized float32 buffers of probabilities and uniforms."""
    rows = _rows(delta)
    keep = torch.empty(rows.shape, dtype=torch.bool, device=rows.device)
    for part, probs in _della_row_blocks(rows, density, epsilon, even=True):
        keep[part] = uniform_like(probs, generator) < probs
    return keep.reshape(delta.shape)


def _della_row_blocks(
    rows: torch.Tensor, density: float, epsilon: float, *, even: bool = False
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows slice, keep probabilities) for blocks of ~``DELLA_BLOCK`` entries of an (R, n) tensor.

    Rows are independent, so the int64 sort indices and ranks exist for one block (a few MB), never for
    the whole tensor. ``even``: every block but the last holds an even number of entries, so drawing
    block by block consumes the raw 64-bit draws exactly as one whole-tensor draw.
    """
    count, n = rows.shape
    if n == 1:  # mergekit's (rank − min)/(max − min) is 0/0 here; r̃ = ½ gives p = ρ
        half = torch.full(rows.shape, 0.5, dtype=torch.float32, device=rows.device)
        yield slice(0, count), (density - epsilon) + half * (2 * epsilon)
        return
    block = max(1, DELLA_BLOCK // n)
    if even and n % 2 and block % 2:
        block += 1
    positions = torch.arange(n, device=rows.device)
    for start in range(0, count, block):
        magnitudes = rows[start : start + block].abs()
        if magnitudes.device.type == "cpu" and magnitudes.dtype == torch.float32:
            ranks = _stable_row_ranks(magnitudes.numpy())
        else:
            order = torch.argsort(magnitudes, dim=1, stable=True)
            ranks = torch.empty_like(order).scatter_(1, order, positions.expand_as(order))
        rank_norm = ranks.to(torch.float32) / (n - 1)
        yield slice(start, start + block), (density - epsilon) + rank_norm * (2 * epsilon)


def _stable_row_ranks(magnitudes: np.ndarray) -> torch.Tensor:
    """Ranks within each row by ascending value, equal values by index: a stable argsort's ranks.

    Non-negative float32 values order like their bit patterns, so (bits << 32 | index) is a unique uint64
    key in the stable order, and numpy's SIMD sort of plain integers (no stability needed) beats torch's
    stable float argsort several times over on the CPU.
    """
    n = magnitudes.shape[1]
    keys = magnitudes.view(np.uint32).astype(np.uint64)
    keys <<= np.uint64(32)
    keys |= np.arange(n, dtype=np.uint64)
    keys.sort(axis=1)
    keys &= np.uint64(0xFFFFFFFF)  # the indices, in place: below 2³², so their int64 view is the same number
    order = torch.from_numpy(keys.view(np.int64))
    positions = torch.arange(n).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)  # torch's scatter is ~4× numpy's put


# --------------------------------------------------------------------------------------------- rescale


def as_factor(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as 0/1 factors to multiply by in place: its bytes viewed as uint8, which a float
    product promotes on the fly. An in-place product with the bool tensor itself is ~10× slower, and
    converting it to float first costs 0.9 ns per entry against 0.2 (measured on the CPU)."""
    return mask.view(torch.uint8)


def masked(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """m ⊙ δ, optionally L1-rescaled as :func:`l1_rescale` does, computed *in place*: ``delta`` is consumed.

    Sparsifiers own their task vectors, so masking them in place saves a tensor-sized copy per model.
    A dropped entry becomes ±0, which never counts as a sign.
    """
    before = blocked_sum(delta.abs()) if rescale else 0.0
    kept = delta.mul_(as_factor(mask))
    if not rescale:
        return kept
    factor = l1_factor(before, blocked_sum(kept.abs()))
    return kept if factor is None else kept.mul_(factor)


def l1_factor(before: float, after: float) -> float | None:
    """‖δ‖₁/‖kept‖₁, or ``None`` (no rescale) when either norm is below 1e-7, where the ratio is noise."""
    return before / after if before >= RESCALE_EPS and after >= RESCALE_EPS else None


def l1_rescale(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Multiply ``kept`` by ‖δ‖₁/‖kept‖₁ (mergekit's ``RescaleNorm.l1``).

    This is an exact per-tensor norm match, not the papers' 1/ρ (equal only in expectation). Skipped when
    either norm is below 1e-7, where the ratio would be noise. (Blocked sums, not ``vector_norm(ord=1)``,
    which is 0.5 % off on large CPU tensors; see the reductions above.)
    """
    factor = l1_factor(blocked_sum(delta.abs()), blocked_sum(kept.abs()))
    return kept if factor is None else kept * factor


# --------------------------------------------------------------------------------------------- consensus


def elect_signs(weighted: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES sign election on the weighted deltas: σ = +1 where Σ_i Δ_i ≥ 0, else −1.

    mergekit (and so this library) elects from the *weighted* sum Σ w_i δ_i; the TIES paper and PEFT use
    the unweighted δ (mergekit issue #474).
    """
    total = weighted[0].clone()
    for d in weighted[1:]:
        total += d
    one = torch.ones((), dtype=total.dtype, device=total.device)
    return torch.where(total >= 0, one, -one)


def sign_masks(weighted: Sequence[torch.Tensor], sigma: torch.Tensor) -> list[torch.Tensor]:
    """m_i = [sign(Δ_i) = σ]; a pruned (zero) entry has sign 0 and never agrees."""
    return [torch.sign(d) == sigma for d in weighted]


def consensus_sum(weighted: Sequence[torch.Tensor], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`elect_signs` + :func:`sign_masks` + :func:`disjoint_sum` in a few fused passes.

    With σ = ±1 the elected sign, Δ_i agrees exactly where Δ_i·σ > 0 (a pruned zero never agrees), so one
    float 0/1 mask per model gives both the disjoint sum Σ a_i Δ_i and the divisor Σ a_i w_i: 4 passes per
    model, no bool masks, no per-sign partial sums. Consumes ``weighted`` (the caller's temporaries).
    """
    total = weighted[0] + weighted[1] if len(weighted) > 1 else weighted[0].clone()
    for d in weighted[2:]:
        total.add_(d)
    # σ = +1 where Σ ≥ 0: copysign gives −1 only at −0, a sum of zeros, where nothing can agree anyway.
    # Float ops throughout: comparisons into bool tensors and `where` cost 5–20× more on the CPU.
    sigma = torch.copysign(torch.ones((), dtype=total.dtype, device=total.device), total)
    mixed = divisor = None
    for d, w in zip(weighted, weights, strict=True):
        agree = torch.mul(d, sigma).gt_(0)  # 1.0 where Δ_i has the elected sign, else 0.0
        if mixed is None or divisor is None:
            mixed = d.mul_(agree)
            divisor = agree.mul_(w)
        else:
            mixed.addcmul_(d, agree)
            divisor.add_(agree, alpha=w)
    assert mixed is not None and divisor is not None
    divisor.add_(divisor.clone().eq_(0))  # 0 → 1 where nothing agrees (the sum there is 0 too)
    return mixed, divisor


def disjoint_sum(
    weighted: Sequence[torch.Tensor], weights: Sequence[float], masks: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_i m_i Δ_i, Σ_i m_i w_i) with a zero divisor replaced by 1.

    Dividing the first by the second is TIES' disjoint mean, weighted by w (mergekit's form). Where no
    model agrees the sum is 0 too, so replacing 0 by 1 only avoids 0/0.
    """
    zero = torch.zeros((), dtype=weighted[0].dtype, device=weighted[0].device)
    mixed = torch.zeros_like(weighted[0])
    divisor = torch.zeros_like(weighted[0])
    for d, w, m in zip(weighted, weights, masks, strict=True):
        mixed += torch.where(m, d, zero)
        divisor += m.to(divisor.dtype) * w
    divisor[divisor == 0] = 1
    return mixed, divisor


# --------------------------------------------------------------------------------------------- slerp


def slerp_flat(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation of two tensors treated as single flattened vectors (mergekit ``slerp``).

    d = ⟨v0/‖v0‖, v1/‖v1‖⟩ (a norm ≤ eps is left unnormalised); if |d| > ``dot_threshold`` the vectors are
    (anti)parallel enough that slerp is ill-conditioned and the result is the plain (1−t)·v0 + t·v1;
    otherwise, with θ = arccos d, sin((1−t)θ)/sin θ·v0 + sin(tθ)/sin θ·v1 on the *unnormalised* vectors.
    The scalars are computed in float64 from blocked float32 reductions (:func:`flat_dot`).
    """
    s0, s1 = slerp_coefficients(t, flat_dot(v0, v0), flat_dot(v1, v1), flat_dot(v0, v1), dot_threshold, eps)
    return s0 * v0 + s1 * v1


def slerp_coefficients(
    t: float, norm0_sq: float, norm1_sq: float, dot: float, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> tuple[float, float]:
    """(s0, s1) of :func:`slerp_flat` from the squared norms and the inner product of v0 and v1."""
    n0, n1 = math.sqrt(norm0_sq), math.sqrt(norm1_sq)
    cos = dot / ((n0 if n0 > eps else 1.0) * (n1 if n1 > eps else 1.0))
    if abs(cos) > dot_threshold:
        return 1 - t, t
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return math.sin((1 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def slerp_rows(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise spherical interpolation along the last dimension (mergekit ``nuslerp`` semantics).

    Each row is normalised with its norm clamped at 1e-7, θ = arccos(clamp(cos, −1, 1)) and the result is
    (sin((1−t)θ)·v0 + sin(tθ)·v1)/sin θ; rows with |sin θ| < eps use (1−t)·v0 + t·v1. The per-row angle is
    taken in float64 so that exactly (anti)parallel rows reach the lerp branch instead of dividing by a
    float32 rounding residue of sin π.
    """
    n0 = row_norm(v0).clamp(min=1e-7)
    n1 = row_norm(v1).clamp(min=1e-7)
    cos = (row_dot(v0, v1) / (n0 * n1)).double().clamp(-1, 1)
    theta = torch.acos(cos)
    sin_theta = torch.sin(theta)
    colinear = sin_theta.abs() < eps
    safe_sin = torch.where(colinear, torch.ones_like(sin_theta), sin_theta)
    c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / safe_sin).to(v0.dtype)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / safe_sin).to(v0.dtype)
    return c0 * v0 + c1 * v1
