"""Wall time and peak resident memory of one build step, measured in this process.

Linux lets a process reset its own peak-RSS mark (``VmHWM``) by writing ``5`` to
``/proc/self/clear_refs``, so each stage of a comparison gets its own peak even though all run in one
process. Where that is not possible, the peak is the process's peak so far (``ru_maxrss``), an upper
bound, and the record says so.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_is_per_step: bool = False  # False: the process's peak so far, an upper bound


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _peak_rss() -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


@contextmanager
def measured() -> Iterator[Measurement]:
    """Time the block and take its peak resident memory into the yielded :class:`Measurement`."""
    measurement = Measurement(peak_is_per_step=_reset_peak())
    started = time.perf_counter()
    try:
        yield measurement
    finally:
        measurement.seconds = time.perf_counter() - started
        measurement.peak_rss_bytes = _peak_rss()
