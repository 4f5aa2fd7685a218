"""The data schedule: every sequence once per epoch, the same steps however they are split over ranks."""

from __future__ import annotations

import pytest
import torch

from gift_merge.train.schedule import Schedule


def test_each_epoch_covers_every_sequence_once() -> None:
    schedule = Schedule(num_sequences=23, batch_size=4, grad_accum=2, world=1, epochs=2, seed=3)
    assert schedule.micro_batches_per_epoch == 6 and schedule.total_steps == 6  # 3 steps per epoch
    for epoch in range(2):
        steps = range(epoch * 3, epoch * 3 + 3)
        seen = [i for s in steps for mb in schedule.step_micro_batches(s) for i in mb.sequences]
        assert sorted(seen) == list(range(23))
    first, second = schedule.step_micro_batches(0), schedule.step_micro_batches(3)
    assert first[0].sequences != second[0].sequences  # reshuffled each epoch
    assert [mb.index for s in range(6) for mb in schedule.step_micro_batches(s)] == list(range(12))


def test_ranks_share_the_steps_of_one_process() -> None:
    one = Schedule(num_sequences=36, batch_size=2, grad_accum=4, world=1, epochs=1, seed=0)
    two = Schedule(num_sequences=36, batch_size=2, grad_accum=2, world=2, epochs=1, seed=0)
    assert one.total_steps == two.total_steps == 5  # 18 micro-batches, 4 per step: 4 + 4 + 4 + 4 + 2
    for step in range(5):
        together = one.step_micro_batches(step)
        parts = [two.rank_micro_batches(step, rank)[0] for rank in range(2)]
        assert sorted(mb.index for part in parts for mb in part) == [mb.index for mb in together]
        assert all(two.rank_micro_batches(step, rank)[1] == len(together) for rank in range(2))


def test_short_last_step_gives_fillers_to_idle_ranks() -> None:
    schedule = Schedule(num_sequences=10, batch_size=2, grad_accum=2, world=4, epochs=1, seed=0)
    assert schedule.total_steps == 1  # 5 micro-batches for 8 slots
    shares = [schedule.rank_micro_batches(0, rank) for rank in range(4)]
    assert [len(mine) for mine, _ in shares] == [2, 2, 2, 2]  # every rank joins both all-reduces
    assert [sum(mb.filler for mb in mine) for mine, _ in shares] == [0, 1, 1, 1]
    assert {count for _, count in shares} == {5}


def test_drop_last_accumulation_takes_only_full_steps() -> None:
    # 10 rows, batch 1, accumulation 4: ⌊10 / 4⌋ = 2 steps over the epoch order's first 2 · 4 · 1 = 8 rows
    # (rounding up takes 3, the last with 2 micro-batches).
    full = Schedule(num_sequences=10, batch_size=1, grad_accum=4, world=1, epochs=2, seed=7)
    drop = Schedule(num_sequences=10, batch_size=1, grad_accum=4, world=1, epochs=2, seed=7, drop_last=True)
    assert (full.steps_per_epoch, drop.steps_per_epoch, drop.total_steps) == (3, 2, 4)
    for epoch in range(2):
        order = [i for s in range(3 * epoch, 3 * epoch + 3) for mb in full.step_micro_batches(s) for i in mb.sequences]
        taken = [i for s in range(2 * epoch, 2 * epoch + 2) for mb in drop.step_micro_batches(s) for i in mb.sequences]
        assert sorted(order) == list(range(10)) and taken == order[:8]
        assert [drop.epoch_of(s) for s in range(2 * epoch, 2 * epoch + 2)] == [epoch, epoch]
    assert all(len(drop.step_micro_batches(s)) == 4 for s in range(4))

    # The paper's run: 2,000 rows at 4 × 64 → 500 micro-batches, ⌊500 / 64⌋ = 7 steps over 1,792 rows.
    paper = Schedule(num_sequences=2000, batch_size=4, grad_accum=64, world=1, epochs=1, seed=42, drop_last=True)
    assert paper.total_steps == 7 and Schedule(2000, 4, 64, 1, 1, 42).total_steps == 8
    assert sum(len(mb.sequences) for s in range(7) for mb in paper.step_micro_batches(s)) == 1792


def test_drop_last_accumulation_counts_micro_batches_of_all_ranks() -> None:
    one = Schedule(num_sequences=10, batch_size=1, grad_accum=4, world=1, epochs=1, seed=0, drop_last=True)
    two = Schedule(num_sequences=10, batch_size=1, grad_accum=2, world=2, epochs=1, seed=0, drop_last=True)
    assert one.total_steps == two.total_steps == 2
    for step in range(2):
        shares = [two.rank_micro_batches(step, rank) for rank in range(2)]
        assert all(count == 4 and not any(mb.filler for mb in mine) for mine, count in shares)  # always full
        assert sorted(mb.index for mine, _ in shares for mb in mine) == [
            mb.index for mb in one.step_micro_batches(step)
        ]
    assert Schedule(3, 1, 2, 2, 1, 0, drop_last=True).total_steps == 0  # 3 micro-batches < one step of 4


def test_lr_schedule_of_the_paper_run() -> None:
    """7 steps, warmup ⌈0.7⌉ = 1: lr 0, then linear decay from 2e-4 reaching 0 one step past the last."""
    from gift_merge.train.loop import lr_schedule

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    scheduler, warmup = lr_schedule(optimizer, 7, 0.1)
    lrs = []
    for _ in range(7):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert warmup == 1
    expected = [0.0] + [2e-4 * (7 - k) / 6 for k in range(1, 7)]  # 2e-4, 1.667e-4, … 3.33e-5
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[2] == pytest.approx(1.667e-4, rel=2e-3) and lrs[-1] == pytest.approx(3.33e-5, rel=2e-3)
