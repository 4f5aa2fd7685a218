"""How a job's output is cut into blocks of rows: one rule for both engines.

Elementwise methods read their inputs in these blocks, and an adapter's ΔW is formed for one block at a
time (:func:`gift_merge.operators.adapters.delta_rows`), so the bits of ΔW never depend on the backend. Small
tensors are one block; large ones a few MB of float32 per input at a time.
"""

from __future__ import annotations

ELEMENTWISE_CHUNK = 1 << 19
"""Entries per block of rows: 2 MB per fp32 input, cache-resident."""
CHUNK_FROM = 1 << 20
"""Tensors below this many entries are one block: smaller ones gain nothing from slicing."""
PIECE = 1 << 16
"""Entries an elementwise mix computes at once within a block (even, so random draws taken piece by piece
consume a generator as one draw): a piece of every input, its temporaries and the output stay in the
core's cache, where a whole block's passes would each go to memory (2.0 against 4.0 ns per output entry
for a three-model bf16 linear merge on a 2-core EPYC)."""


def rows_per_block(shape: tuple[int, ...]) -> int:
    """Rows of a block for a tensor of ``shape`` (all of them below :data:`CHUNK_FROM` entries)."""
    if not shape:
        return 1
    numel = 1
    for d in shape:
        numel *= d
    if numel < CHUNK_FROM:
        return max(shape[0], 1)
    row_numel = numel // shape[0] if shape[0] else 1
    return max(1, ELEMENTWISE_CHUNK // max(row_numel, 1))


def pieces(part: slice) -> list[slice]:
    """``part`` (a flat slice) cut into :data:`PIECE`-entry slices, in order."""
    start, stop = part.start or 0, part.stop
    return [slice(at, min(at + PIECE, stop)) for at in range(start, stop, PIECE)] or [part]


def row_blocks(shape: tuple[int, ...]) -> list[slice]:
    """The blocks of rows of a tensor of ``shape``, in order (one slice for a 0-d tensor)."""
    rows = shape[0] if shape else 1
    step = rows_per_block(shape)
    return [slice(start, start + step) for start in range(0, rows, step)] or [slice(0, 0)]
