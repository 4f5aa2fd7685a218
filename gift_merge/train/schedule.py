"""Which sequences go into which micro-batch, optimizer step and rank: a pure function of the seed.

Each epoch shuffles the sequences with a generator seeded by (seed, epoch), cuts them into micro-batches
of ``batch_size`` and groups ``grad_accum × world`` consecutive micro-batches into one optimizer step;
within a step, rank ``r`` takes micro-batches ``r, r + world, …``. The grouping depends on
``grad_accum × world`` only, so one process with ``grad_accum = 2`` sees exactly the steps that two
ranks with ``grad_accum = 1`` see together, and a resumed run can skip straight to its step.

The last step of an epoch may hold fewer micro-batches (it is normalised by its own count); ranks left
without one get a *filler*: a real micro-batch whose loss is multiplied by 0, so every rank still joins
the gradient all-reduce. With ``drop_last`` that short step is skipped instead, as transformers 4.51
(the GIFT authors' version) did: ⌊micro-batches / (grad_accum × world)⌋ full steps per epoch, over the
first micro-batches of the epoch's order, so every step is full and no rank needs a filler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MicroBatch:
    """Sequence indices of one micro-batch; ``index`` numbers it across the run (it seeds dropout)."""

    index: int
    sequences: tuple[int, ...]
    filler: bool = False


@dataclass(frozen=True)
class Schedule:
    num_sequences: int
    batch_size: int
    grad_accum: int
    world: int
    epochs: int
    seed: int
    drop_last: bool = False  # skip each epoch's short last step

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.num_sequences / self.batch_size)

    @property
    def per_step(self) -> int:
        """Micro-batches in a full optimizer step, over all ranks."""
        return self.grad_accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch; 0 when ``drop_last`` leaves not even one full step."""
        if self.drop_last:
            return self.micro_batches_per_epoch // self.per_step
        return math.ceil(self.micro_batches_per_epoch / self.per_step)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000 + epoch)
        return torch.randperm(self.num_sequences, generator=generator).tolist()

    def step_micro_batches(self, step: int) -> list[MicroBatch]:
        """All micro-batches of optimizer ``step`` (0-based), over all ranks, in order."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        first = within * self.per_step
        last = min(first + self.per_step, self.micro_batches_per_epoch)
        offset = epoch * self.micro_batches_per_epoch
        return [
            MicroBatch(offset + m, tuple(order[m * self.batch_size : (m + 1) * self.batch_size]))
            for m in range(first, last)
        ]

    def rank_micro_batches(self, step: int, rank: int) -> tuple[list[MicroBatch], int]:
        """This rank's micro-batches of ``step`` (fillers included) and the step's real micro-batch count."""
        batches = self.step_micro_batches(step)
        mine = batches[rank :: self.world]
        slots = math.ceil(len(batches) / self.world)
        while len(mine) < slots:
            template = batches[0]
            mine.append(MicroBatch(template.index, template.sequences, filler=True))
        return mine, len(batches)
