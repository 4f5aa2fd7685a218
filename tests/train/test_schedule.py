"""The data schedule: every sequence once per epoch, the same steps however they are split over ranks."""

from __future__ import annotations

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
