"""Which rows annotation scores together, which shard owns them, and joining shard files into one.

A row's score depends on the batch it is scored in, in the last bits: padding a row to a longer
neighbour's width changes the shapes the matmuls reduce over. So shards split the single run's own
batches, never its rows: rows are cut into windows of ``WINDOW_BATCHES`` batches from the first row, each
window's scored rows are sorted by length and cut into batches (exactly what one process does), and
batch ``g`` (counted over all windows) belongs to shard ``g mod N``. Round robin over length-sorted
batches gives every shard a similar number of tokens. Rows with nothing to score belong to shard
``row mod N``.

A shard file ``OUT.shard-I-of-N`` holds its rows' output lines, window by window, in input order within a
window; ``OUT.shard-I-of-N.json`` records the settings it was made with. :func:`combine` reads all N a
window at a time, checks every line against its input row and writes the lines in input order: the
bytes one process writes, given the same device, dtype and (on a CPU) thread count.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from gift_merge.errors import GiftMergeError

log = logging.getLogger(__name__)

WINDOW_BATCHES = 32
"""Rows are length-sorted within windows of this many batches: long enough to pad little, short
enough that a killed run loses little and output can stay in input order."""

Rows = list[tuple[int, dict[str, Any]]]
"""``(line number, row)`` of the input, as :func:`gift_merge.train.data.read_jsonl` gives them."""


@dataclass(frozen=True)
class Layout:
    """The single run's windows and batches, and the shard that owns each row."""

    windows: list[range]  # input rows of each window
    batches: list[list[list[int]]]  # per window: its scored rows, longest first, cut into batches
    owner: list[int]  # per row: its shard

    @classmethod
    def of(cls, lengths: list[int], scored: list[bool], batch_size: int, num_shards: int) -> Layout:
        """From each row's token count and whether it has anything to score."""
        size = batch_size * WINDOW_BATCHES
        windows = [range(start, min(start + size, len(lengths))) for start in range(0, len(lengths), size)]
        owner = [row % num_shards for row in range(len(lengths))]
        batches = []
        count = 0
        for window in windows:
            order = sorted((k for k in window if scored[k]), key=lambda k: lengths[k], reverse=True)
            cut = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
            for batch in cut:
                for k in batch:
                    owner[k] = count % num_shards
                count += 1
            batches.append(cut)
        return cls(windows, batches, owner)

    def rows_of(self, shard: int, window: int) -> list[int]:
        """The rows of ``window`` that ``shard`` writes, in the order it writes them."""
        return [k for k in self.windows[window] if self.owner[k] == shard]

    def batches_of(self, shard: int, window: int) -> list[list[int]]:
        return [batch for batch in self.batches[window] if self.owner[batch[0]] == shard]


def shard_path(out: Path, shard: int, num_shards: int) -> Path:
    return out.with_name(f"{out.name}.shard-{shard}-of-{num_shards}")


def settings_path(path: Path) -> Path:
    """The settings a work or shard file was made with live beside it."""
    return path.with_name(path.name + ".json")


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file that becomes ``path`` only when the block ends without error (fsynced, renamed)."""
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def write_atomically(path: Path, text: str) -> None:
    with atomic_file(path) as file:
        file.write(text.encode("utf-8"))


def missing_shards(out: Path, num_shards: int) -> list[int]:
    return [s for s in range(num_shards) if not shard_path(out, s, num_shards).exists()]


def combine(out: Path, rows: Rows, layout: Layout, settings: dict[str, Any]) -> Path:
    """Join the finished ``OUT.shard-I-of-N`` files into ``out`` (atomically) and delete them.

    ``settings`` are the ones that decide the layout and the rows' content (model, prompt, max length,
    batch size, N); every shard must have been made with them, and with the dtype and device of shard 0.
    """
    num_shards = int(settings["num_shards"])
    paths = [shard_path(out, s, num_shards) for s in range(num_shards)]
    missing = missing_shards(out, num_shards)
    if missing:
        first = missing[0]
        raise GiftMergeError(f"{paths[first]}: missing; annotate --shard {first} first{_others(out, num_shards)}")
    _check_settings(paths, settings)
    with ExitStack() as stack:
        readers = [enumerate(stack.enter_context(p.open("rb")), start=1) for p in paths]
        file = stack.enter_context(atomic_file(out))
        for w, window in enumerate(layout.windows):
            lines: dict[int, bytes] = {}
            for shard, reader in enumerate(readers):
                for k in layout.rows_of(shard, w):
                    lines[k] = _checked(next(reader, None), rows[k], paths[shard])
            file.writelines(lines[k] for k in window)
        for shard, reader in enumerate(readers):
            if next(reader, None) is not None:
                raise GiftMergeError(f"{paths[shard]}: has more rows than its shard of the input")
    for path in paths:
        path.unlink(missing_ok=True)
        settings_path(path).unlink(missing_ok=True)
    log.info("joined %d shards into %s", num_shards, out)
    return out


def _checked(item: tuple[int, bytes] | None, expected: tuple[int, dict[str, Any]], path: Path) -> bytes:
    """The shard's next line, if it is complete and holds the expected input row."""
    line, row = expected
    if item is None:
        raise GiftMergeError(f"{path}: ends before input line {line}; annotate its shard again")
    number, text = item
    if not text.endswith(b"\n"):
        raise GiftMergeError(f"{path}:{number}: cut off; annotate its shard again")
    try:
        written = json.loads(text)
    except json.JSONDecodeError:
        raise GiftMergeError(f"{path}:{number}: invalid JSON; annotate its shard again") from None
    if not isinstance(written, dict) or _fields(written) != _fields(row):
        raise GiftMergeError(f"{path}:{number}: does not match input line {line}; was it made from other data?")
    return text


def _fields(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "scores"}


def _check_settings(paths: list[Path], settings: dict[str, Any]) -> None:
    """Every shard made with ``settings``, and with the same dtype and device as the first."""
    first: dict[str, Any] | None = None
    for shard, path in enumerate(paths):
        sidecar = settings_path(path)
        try:
            made = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise GiftMergeError(f"{sidecar}: missing or unreadable; annotate --shard {shard} again") from None
        first = first or made
        for key, value in {**settings, "dtype": first.get("dtype"), "device": first.get("device")}.items():
            if made.get(key) != value:
                again = f"delete it and annotate --shard {shard} again"
                raise GiftMergeError(f"{path}: made with another {key} ({made.get(key)!r}, not {value!r}); {again}")


def _others(out: Path, num_shards: int) -> str:
    """A hint when shard files of another N lie beside ``out``."""
    pattern = re.compile(re.escape(out.name) + r"\.shard-\d+-of-(\d+)$")
    found = sorted({int(m[1]) for p in out.parent.glob(f"{out.name}.shard-*") if (m := pattern.match(p.name))})
    other = [n for n in found if n != num_shards]
    return f" (found shards of --num-shards {', '.join(map(str, other))})" if other else ""
