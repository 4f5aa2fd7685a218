"""Progress of long steps, on a terminal and off one.

tqdm draws a bar on a terminal and, left to itself, nothing at all when its output is a log file, CI or
``nohup``: a 20-minute merge or a day of training was silent until its last line. Here a bar is drawn on a
terminal, and elsewhere a line is logged every few seconds (done of total, rate, time left, and the
step's own figures such as the loss).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from tqdm import tqdm

log = logging.getLogger("gift_merge")

INTERVAL_SECONDS = float(os.environ.get("GIFT_MERGE_PROGRESS_SECONDS", "10"))
"""Seconds between progress lines off a terminal (``GIFT_MERGE_PROGRESS_SECONDS`` overrides)."""


def progress(
    *, total: int, desc: str, unit: str = "it", initial: int = 0, quiet: bool = False, unit_scale: bool = False
) -> Any:
    """A tqdm bar on a terminal, :class:`ProgressLines` elsewhere, nothing with ``quiet``; same methods."""
    if quiet:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, unit=unit, desc=desc, unit_scale=unit_scale,
                    unit_divisor=1024 if unit_scale else 1000, dynamic_ncols=True)  # fmt: skip
    return ProgressLines(total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale)


class ProgressLines:
    """The part of tqdm's interface gift-merge uses, writing a log line every :data:`INTERVAL_SECONDS`."""

    def __init__(self, *, total: int, desc: str, unit: str, initial: int = 0, unit_scale: bool = False) -> None:
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.n = self.initial = initial
        self.postfix = ""
        self.started = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= INTERVAL_SECONDS:
            self.last = now
            log.info("%s", self.line(now))

    def set_postfix(self, refresh: bool = True, **figures: Any) -> None:
        self.postfix = ", ".join(f"{key} {value}" for key, value in figures.items())

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def line(self, now: float) -> str:
        elapsed = now - self.started
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.n) / rate if rate > 0 else float("nan")
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = f", {_duration(left)} left" if left == left else ""
        extra = f", {self.postfix}" if self.postfix else ""
        unit = "" if self.unit_scale else f" {self.unit}"
        return (
            f"{self.desc}: {self._amount(self.n)} of {self._amount(self.total)}{unit}{share}, "
            f"{self._amount(rate)}{unit}/s{eta}{extra}"
        )

    def _amount(self, value: float) -> str:
        """A count, or with ``unit_scale`` an amount in binary units of the unit (``1.5 GiB``)."""
        if not self.unit_scale:
            return f"{value:,.0f}" if value >= 10 or value == int(value) else f"{value:.2f}"
        for scale, prefix in ((1 << 30, "Gi"), (1 << 20, "Mi"), (1 << 10, "Ki")):
            if value >= scale:
                return f"{value / scale:.1f} {prefix}{self.unit}"
        return f"{value:.0f} {self.unit}"

    def close(self) -> None:
        if self.n > self.initial and time.monotonic() - self.started >= INTERVAL_SECONDS:
            log.info("%s: done, %s", self.desc, self.line(time.monotonic()).split(": ", 1)[1])

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
