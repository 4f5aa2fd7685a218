"""One writer per output folder, and the leftovers of writers that died.

Two runs into the same output used to both succeed, the second silently replacing the first's result.
A run now holds ``.NAME.lock`` beside its output folder for its whole duration (created exclusively,
holding the process id), so a second run refuses at once and names the first. A lock or a temporary
folder whose process no longer exists (killed with SIGKILL, a power cut) is taken over or removed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gift_merge.errors import GiftMergeError

LEFTOVER_KINDS = ("partial", "old")  # writer.atomic_output_folder's temporary names: .NAME.partial-PID, .NAME.old-PID


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path(folder: Path) -> Path:
    folder = folder.resolve()
    return folder.parent / f".{folder.name}.lock"


@contextmanager
def output_lock(folder: Path) -> Iterator[None]:
    """Hold the lock of ``folder`` for the block; refuse at once if another live process holds it.

    Re-entrant within a process: a run that locked its output for all its stages writes the final stage
    through :func:`~gift_merge.io.writer.atomic_output_folder`, which takes the same lock.
    """
    lock = lock_path(folder)
    if _holder(lock) == os.getpid():
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    _acquire(lock, folder)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _acquire(lock: Path, folder: Path) -> None:
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder is not None and not pid_alive(holder):
                lock.unlink(missing_ok=True)  # left by a process that no longer runs
                continue
            who = f"process {holder}" if holder is not None else f"a process (see {lock})"
            raise GiftMergeError(
                f"{folder}: another gift-merge run ({who}) is writing this output; wait for it, or choose another "
                "output folder"
            ) from None
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        return
    raise GiftMergeError(f"{lock}: cannot take the lock of {folder}")


def _holder(lock: Path) -> int | None:
    try:
        text = lock.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove temporary folders of ``folder`` whose writing process no longer exists; return them."""
    folder = folder.resolve()
    removed = []
    for kind in LEFTOVER_KINDS:
        for path in folder.parent.glob(f".{folder.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed
