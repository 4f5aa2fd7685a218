"""Tensor-sized arrays a multi-pass method (multislerp, karcher) keeps between its passes.

Each of their norms and inner products spans the whole tensor, so each is a pass over slices; the
per-entry values the passes share (unit vectors, a mean direction) are held while they fit the job's
buffer limit and formed again from the inputs in every pass beyond it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Operands


def held_fits(count: int, numel: int, buffer_limit: int) -> bool:
    """Whether ``count`` arrays of ``numel`` entries are held: at 8 bytes per entry, so float64 fits too."""
    return count * numel * 8 <= buffer_limit


class Held:
    """Up to ``count`` tensor-sized arrays a multi-pass method keeps between passes while they fit the job's
    buffer limit (:attr:`~gift_merge.operators.base.Operands.buffer_limit`, at 8 bytes per entry, so float64
    values fit too); false when they do not, and the method forms its values again from the inputs in each
    pass instead (the same operations, so the same bits).
    """

    def __init__(self, operands: Operands[Any], count: int) -> None:
        self.backend, self.numel = operands.backend, operands.numel
        self.fits = held_fits(count, operands.numel, operands.buffer_limit)
        self.arrays: list[Any] = []

    def __bool__(self) -> bool:
        return self.fits

    def keep(self, part: slice, values: list[Any]) -> None:
        """Store one slice of each array (no-op when they do not fit); the first call allocates the arrays
        in the dtypes of ``values``."""
        if not self.fits:
            return
        if not self.arrays:
            self.arrays = [self.backend.empty(self.numel, str(v.dtype).removeprefix("torch.")) for v in values]
        for array, value in zip(self.arrays, values, strict=True):
            array[part] = value

    def at(self, part: slice) -> list[Any]:
        """One slice of each held array (views)."""
        return [array[part] for array in self.arrays]

    def set(self, index: int, part: slice, value: Any) -> None:
        """Replace one slice of held array ``index`` (no-op when nothing is held)."""
        if self.fits:
            self.arrays[index][part] = value
