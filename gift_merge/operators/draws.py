"""Random draws of the random methods (DARE, DELLA): one documented protocol, on the CPU, for every device.

Each random method gets a generator seeded by (recipe seed, tensor name) (:func:`base.generator_for`), and
each model, in input order, consumes one draw per entry of the tensor, even a model that keeps everything,
so one model's density never moves another model's mask. A draw is a 32-bit half (low half first) of the
generator's raw 64-bit output; its top 24 bits times 2⁻²⁴ is u ∈ [0, 1), exact in float32 (as
``torch.rand``'s values are). Draws are made on the host and moved to the device, so the same seed gives
the same mask on every device. Drawing slice by slice gives the same draws as one whole draw as long as
every slice but the last has an even length (:data:`base.CHUNK` is even).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from gift_merge.lazy import torch

if TYPE_CHECKING:
    from gift_merge.engine.backend import Backend


def _bit_generator(generator: np.random.Generator | None) -> np.random.BitGenerator:
    if generator is None:
        raise ValueError("a random merge method needs a generator (see base.generator_for)")
    return generator.bit_generator


def raw_draws(generator: np.random.Generator | None, count: int) -> np.ndarray:
    """``count`` uint32 draws: the 32-bit halves (low first) of the generator's raw 64-bit outputs.

    Raw bits are 2× faster than ``Generator.random`` and 4× faster than ``torch.rand``."""
    return _bit_generator(generator).random_raw((count + 1) // 2).view(np.uint32)[:count]


def skip_draws(generator: np.random.Generator | None, count: int) -> None:
    """Advance ``generator`` exactly as ``count`` draws would, without making them."""
    _bit_generator(generator).advance((count + 1) // 2)  # type: ignore[attr-defined]  # PCG64DXSM jumps ahead


def uniform(generator: np.random.Generator | None, count: int) -> np.ndarray:
    """``count`` float32 u ∈ [0, 1): the top 24 bits of each draw, times 2⁻²⁴."""
    values = (raw_draws(generator, count) >> np.uint32(8)).astype(np.float32)
    values *= np.float32(2.0**-24)
    return values


def bernoulli(generator: np.random.Generator | None, count: int, density: float) -> np.ndarray:
    """``count`` Bernoulli(ρ) draws as a bool array: u < ρ for the :func:`uniform` u, decided on the raw
    bits (top 24 bits < ⌈ρ·2²⁴⌉), which skips the float conversion and is exactly the same test."""
    bits = raw_draws(generator, count)
    limit = math.ceil(density * 2**24)
    if limit <= 0:
        return np.zeros(count, dtype=bool)
    if limit >= 2**24:
        return np.ones(count, dtype=bool)
    return bits <= np.uint32(limit * 256 - 1)


REPLAY_BLOCK = 1 << 18
"""Entries per block of a replayed Bernoulli mask (even, so block draws are the whole draw's)."""


def replay_generator(generator: np.random.Generator | None) -> Callable[[], np.random.Generator]:
    """A function returning, at each call, a new generator in the state ``generator`` is in now: the same
    draws again, as often as a streamed cut needs them."""
    bit_generator = _bit_generator(generator)
    kind, state = type(bit_generator), copy.deepcopy(bit_generator.state)

    def fresh() -> np.random.Generator:
        again = kind()
        again.state = copy.deepcopy(state)
        return np.random.Generator(again)

    return fresh


class Replay:
    """Values over a flat range, made in consecutive blocks by ``blocks`` and served for slices in
    increasing, contiguous order with one block held at a time: a mask too large to keep, made again."""

    def __init__(self, blocks: Iterator[Any]) -> None:
        self.blocks = blocks
        self.block: Any = None
        self.block_start = self.block_end = 0

    def __call__(self, part: slice) -> Any:
        pieces, start = [], part.start
        while start < part.stop:
            if start >= self.block_end:
                if start != self.block_end:
                    raise ValueError("a replayed mask is read in increasing, contiguous slices")
                self.block = next(self.blocks)
                self.block_start, self.block_end = self.block_end, self.block_end + len(self.block)
                continue
            stop = min(part.stop, self.block_end)
            pieces.append(self.block[start - self.block_start : stop - self.block_start])
            start = stop
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if isinstance(pieces[0], np.ndarray) else torch.cat(pieces)


def bernoulli_replay(
    backend: Backend, generator: np.random.Generator | None, count: int, density: float
) -> Callable[[], Replay]:
    """Readers of the :func:`bernoulli` mask of ``count`` entries that ``generator`` would draw next, each
    from its first entry, drawn again in :data:`REPLAY_BLOCK` blocks instead of held."""
    fresh = replay_generator(generator)

    def blocks() -> Iterator[Any]:
        again = fresh()
        for start in range(0, count, REPLAY_BLOCK):
            yield backend.from_host(bernoulli(again, min(REPLAY_BLOCK, count - start), density))

    return lambda: Replay(blocks())
