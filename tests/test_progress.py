"""Progress off a terminal: a log line every few seconds with done, rate and time left."""

from __future__ import annotations

import logging

import pytest

from gift_merge import progress as progress_module
from gift_merge.progress import ProgressLines, progress


def test_off_a_terminal_progress_is_log_lines(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = iter(float(t) for t in range(0, 1000, 4))  # every call is 4 s later
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(progress_module.sys.stderr, "isatty", lambda: False, raising=False)
    bar = progress(total=10, desc="train", unit="step")
    assert isinstance(bar, ProgressLines)
    with caplog.at_level(logging.INFO, logger="gift_merge"):
        for step in range(10):
            bar.set_postfix(loss=f"{1.0 / (step + 1):.4f}")
            bar.update(1)
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) >= 4  # at most one line per interval of 10 s, and a last one
    assert lines[0].startswith("train: 3 of 10 step (30%)")
    assert "left" in lines[0] and "loss 0.3333" in lines[0]
    assert lines[-1].startswith("train: done, 10 of 10 step (100%)")


def test_quiet_shows_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gift_merge"):
        bar = progress(total=5, desc="merge", quiet=True)
        bar.update(5)
        bar.close()
    assert not caplog.records


def test_byte_amounts_read_as_binary_units() -> None:
    bar = ProgressLines(total=3 << 30, desc="merge", unit="B", unit_scale=True)
    bar.n = 1536 << 20
    assert bar.line(bar.started + 1.0).startswith("merge: 1.5 GiB of 3.0 GiB (50%), 1.5 GiB/s, 1s left")
