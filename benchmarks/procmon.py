"""Run a command and sample the memory of its whole process tree from /proc.

Why not ``/usr/bin/time`` or ``ru_maxrss``: those give the peak of the largest *single* process, while a
merge tool may fork workers, and they cannot separate private memory (``RssAnon``: what the tool really
allocated) from page-cache-backed file pages (mmapped safetensors count in RSS but are reclaimable). So
this module sums ``VmRSS`` and ``RssAnon`` over the root process and all its descendants every
``interval`` seconds and keeps the peak of each sum. ``ru_maxrss`` from ``wait4`` is kept as a
cross-check for spikes shorter than the sampling interval.

A forked worker's ``RssAnon`` also counts the parent's anonymous pages it still shares copy-on-write, so
the sum over a tree of forked workers counts those pages once per process: an upper bound. ``Pss_Anon``
(``/proc/PID/smaps_rollup``) divides each shared page among the processes sharing it, so its sum over the
tree is the anonymous memory the tree really holds; it is sampled every ``PSS_EVERY``-th sample, as reading
it walks the page tables of every mapping (the memory-mapped inputs included).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

RESCAN_EVERY = 5  # look for new children every 5th sample only: a /proc scan costs more than a status read
PSS_EVERY = 5  # read smaps_rollup every 5th sample only: it costs milliseconds on a process mapping GBs


@dataclass
class RunResult:
    """What one monitored command did."""

    returncode: int
    wall_s: float
    cpu_s: float  # user + system time of the process and its reaped children: robust to a busy machine
    peak_rss_bytes: int
    peak_anon_bytes: int  # the sum of RssAnon: counts pages forked workers share with their parent once each
    peak_pss_anon_bytes: int  # the sum of Pss_Anon: shared pages divided among their sharers
    max_rss_kernel_bytes: int  # ru_maxrss: largest single process, exact (kernel-tracked)
    samples: int
    peak_procs: int


def _ppid_map(min_pid: int = 0) -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc/<pid>/stat of every pid >= ``min_pid``.

    Children get pids above their root's (until the pid counter wraps, which a benchmark run does not
    reach), so skipping lower pids keeps a scan cheap on a busy machine.
    """
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) < min_pid:
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # the process ended while we looked
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()  # comm may contain spaces and parentheses
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    children = _ppid_map(min_pid=root)
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, ()))
    return out


def read_status(pid: int) -> tuple[int, int] | None:
    """(VmRSS, RssAnon) of one process in bytes, or None if it is gone or a zombie."""
    rss = anon = -1
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    if rss < 0 or anon < 0:
        return None
    return rss, anon


def read_pss_anon(pid: int) -> int | None:
    """Pss_Anon of one process in bytes, or None if it is gone or the kernel has no smaps_rollup."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss_Anon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


class _Sampler(threading.Thread):
    """Background thread that polls the tree until told to stop."""

    def __init__(self, root: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.stop_event = threading.Event()
        self.peak_rss = self.peak_anon = self.peak_pss_anon = self.samples = self.peak_procs = 0

    def run(self) -> None:
        pids = [self.root]
        n = 0
        while not self.stop_event.is_set():
            if n % RESCAN_EVERY == 0:
                pids = descendants(self.root)
            n += 1
            rss = anon = live = 0
            for pid in pids:
                status = read_status(pid)
                if status is not None:
                    rss += status[0]
                    anon += status[1]
                    live += 1
            if live and n % PSS_EVERY == 1:
                self.peak_pss_anon = max(self.peak_pss_anon, sum(read_pss_anon(pid) or 0 for pid in pids))
            if live:
                self.samples += 1
                self.peak_rss = max(self.peak_rss, rss)
                self.peak_anon = max(self.peak_anon, anon)
                self.peak_procs = max(self.peak_procs, live)
            self.stop_event.wait(self.interval)


def run_monitored(
    cmd: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    interval: float = 0.02,
    timeout: float | None = None,
) -> RunResult:
    """Run ``cmd`` with stdout+stderr to ``log_path``; return its wall time and memory peaks."""
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
        sampler = _Sampler(proc.pid, interval)
        sampler.start()
        timer = None
        if timeout is not None:
            timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, 9))
            timer.start()
        # wait4 rather than proc.wait(): it also returns the child's rusage (ru_maxrss, in KiB on Linux).
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen consistent: we reaped it
        if timer is not None:
            timer.cancel()
        sampler.stop_event.set()
        sampler.join()
    return RunResult(
        returncode=proc.returncode,
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_bytes=sampler.peak_rss,
        peak_anon_bytes=sampler.peak_anon,
        peak_pss_anon_bytes=sampler.peak_pss_anon,
        max_rss_kernel_bytes=usage.ru_maxrss * 1024,
        samples=sampler.samples,
        peak_procs=sampler.peak_procs,
    )
