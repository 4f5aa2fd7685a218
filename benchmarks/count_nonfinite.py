"""The cost of counting NaN and ±inf in merge inputs, per bf16 entry, next to the cost of reading memory.

Why: every input tensor a merge reads is counted once per run (``gift_merge.io.finite.InputWatch``),
one extra pass over bits the merge reads anyway. This measures that pass on one large bf16 tensor, so
the cost of the check on a whole merge follows from the number of entries the merge reads:

- ``read floor``: a sum over the bytes as uint64 (each byte read once, nothing written), the least any pass costs;
- ``and/==/count``: the straightforward count, every block masked, compared and counted (three passes);
- ``count_nonfinite``: what gift-merge runs (two read-only max reductions per block, exact count only
  for a block that holds a non-finite value);
- ``reader + watch``: ``CheckpointReader.read_array`` with an ``InputWatch`` on a safetensors file in the
  page cache, through a map already faulted in (what the count adds to a merge) and through a fresh map
  (plus the page faults, which a merge pays on its first read of the tensor anyway); next to a fresh map
  read once without the watch (the faults and one read-only pass).

Times are the minimum of ``--repeats`` runs. Example::

    .venv/bin/python benchmarks/count_nonfinite.py --entries 134217728
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from make_models import SIZES, numel, tensor_specs

from gift_merge.dtypes import BFLOAT16
from gift_merge.io.finite import BLOCK, InputWatch, count_nonfinite
from gift_merge.io.reader import CheckpointReader

SMALL_PARAMS = sum(numel(shape) for _, shape in tensor_specs(SIZES["small"]))  # the 0.49B benchmark model


def bf16_bits(entries: int, seed: int = 0) -> np.ndarray:
    """Gaussian weights as bf16 bits (the top half of float32, truncated: the rounding does not matter here)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(entries, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def three_pass_count(bits: np.ndarray) -> int:
    """The straightforward count: mask, compare and count every block."""
    exponent = np.uint16(0x7F80)
    return sum(int(np.count_nonzero((bits[s : s + BLOCK] & exponent) == exponent)) for s in range(0, bits.size, BLOCK))


def best_ns_per_entry(run: Callable[[], object], entries: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times) / entries * 1e9


def write_safetensors(folder: Path, bits: np.ndarray) -> None:
    header = json.dumps({"w": {"dtype": "BF16", "shape": [bits.size], "data_offsets": [0, bits.nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(folder / "model.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        handle.write(bits.tobytes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1 << 27, help="bf16 entries in the tensor [default: 2^27]")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    n, repeats = args.entries, args.repeats
    bits = bf16_bits(n)
    raw = bits.view(np.uint8)
    rows = {
        "read floor": best_ns_per_entry(lambda: bits.view(np.uint64)[: n // 4].sum(), n, repeats),
        "and/==/count": best_ns_per_entry(lambda: three_pass_count(bits), n, repeats),
        "count_nonfinite": best_ns_per_entry(lambda: count_nonfinite(raw, BFLOAT16), n, repeats),
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_safetensors(folder, bits)
        reader = CheckpointReader(folder)
        reader.read_array("w").view(np.uint64).sum()  # fault the map in

        def warm() -> None:
            reader.watch = InputWatch()
            reader.read_array("w")

        def fresh() -> None:
            CheckpointReader(folder, watch=InputWatch()).read_array("w")

        rows["reader + watch, warm map"] = best_ns_per_entry(warm, n, repeats)
        rows["reader + watch, fresh map"] = best_ns_per_entry(fresh, n, repeats)
        rows["reader, fresh map, no watch, one sum pass"] = best_ns_per_entry(
            lambda: CheckpointReader(folder).read_array("w").view(np.uint64).sum(), n, repeats
        )
    print(f"{n} bf16 entries ({n * 2 / 1e6:.0f} MB), best of {repeats}")
    for name, ns in rows.items():
        print(f"  {name:42s} {ns:6.3f} ns/entry")
    per_entry = rows["count_nonfinite"]
    seconds = per_entry * SMALL_PARAMS * 3 / 1e9
    print(f"  {SMALL_PARAMS / 1e9:.2f}B merge of 3 inputs (the linear, TIES benchmarks): {seconds:.2f} s of one core")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
