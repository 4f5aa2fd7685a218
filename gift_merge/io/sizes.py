"""Human byte sizes for ``--out-shard-size``."""

from __future__ import annotations

import re

from gift_merge.errors import GiftMergeError

_UNITS = {
    "": 1,
    "b": 10**9,  # mergekit's "5B": five billion bytes
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """Bytes from ``500MB``, ``5GB``, ``1.5GiB`` or a plain integer.

    mergekit spells five gigabytes ``5B`` (a billion bytes); that spelling is accepted too, so its
    command lines keep working.
    """
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
        if not match:
            raise GiftMergeError(f"size {text!r}: expected a number with an optional unit, e.g. 500MB or 5GB")
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit not in _UNITS:
            raise GiftMergeError(f"size {text!r}: unknown unit {match.group(2)!r} (use KB, MB, GB, MiB, GiB)")
        value = int(number * _UNITS[unit])
    if value <= 0:
        raise GiftMergeError(f"size {text!r} must be positive")
    return value
