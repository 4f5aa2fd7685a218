"""Human byte sizes for ``--out-shard-size``: a number and a unit, never a bare number.

A bare ``5`` could mean five bytes, five gigabytes (the usual shard size) or mergekit's five billion, and
once meant five bytes here, a checkpoint of one tensor per shard. So the unit is required.
"""

from __future__ import annotations

import re

from gift_merge.errors import GiftMergeError

_UNITS = {
    "b": 10**9,  # mergekit's "5B": five billion bytes
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

UNITS_HELP = "KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of 1024); B is mergekit's billion bytes"
"""The accepted units, in words, for ``--help`` texts and error messages."""


def parse_size(text: str | int, option: str = "size") -> int:
    """Bytes from ``500MB``, ``5GB``, ``1.5GiB``; an ``int`` is taken as bytes (for Python callers).

    mergekit spells five gigabytes ``5B`` (a billion bytes); that spelling is accepted too, so its
    command lines keep working. ``option`` names the option in error messages.
    """
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
        if not match:
            raise GiftMergeError(f"{option}: {text!r} is not a size; write a number and a unit, e.g. 5GB or 500MB")
        number, unit = float(match.group(1)), match.group(2).lower()
        if not unit:
            bare = text.strip()
            raise GiftMergeError(f"{option}: {bare} has no unit; write {bare}GB, 500MB … (units: {UNITS_HELP})")
        if unit not in _UNITS:
            raise GiftMergeError(f"{option}: unknown unit {match.group(2)!r} in {text!r} (use {UNITS_HELP})")
        value = int(number * _UNITS[unit])
    if value <= 0:
        raise GiftMergeError(f"{option}: {text!r} must be more than zero bytes")
    return value
