"""Lazy, read-only access to safetensors checkpoints, single-file or sharded.

Only the headers are parsed up front (a few kilobytes per shard), so a plan over a 70B model costs
nothing. A tensor is a view of its shard's memory map, made when a job asks for it: no copy, and its
pages are the kernel's page cache, not the process's own memory. The map is private (copy-on-write), so
even a stray in-place write could never reach the file.

Opening a checkpoint checks every header against its file as strictly as the safetensors library does
(see :func:`read_header`), and a sharded checkpoint's index against its shards, so a damaged input fails
every command before any output exists, at the cost of reading the headers and the file sizes.

A merge gives its readers an :class:`~gift_merge.io.finite.InputWatch`: every tensor read through
:meth:`CheckpointReader.read` or :meth:`CheckpointReader.read_array` (the only ways both engines read
weights) is then counted for NaN and ±inf, once per run, however many blocks or jobs read it.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gift_merge.dtypes import BY_CODE, DType, of
from gift_merge.errors import GiftMergeError
from gift_merge.io.finite import InputWatch
from gift_merge.lazy import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
ALLOW_PICKLE_ENV = "GIFT_MERGE_ALLOW_PICKLE"


def pickle_allowed() -> bool:
    """Whether the user opted in to pickled ``.bin`` weights (``--allow-pickle`` sets this variable)."""
    return os.environ.get(ALLOW_PICKLE_ENV, "") not in ("", "0", "false", "no")


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, known without reading it."""

    name: str
    shape: tuple[int, ...]
    dtype: DType
    file: Path
    offset: int | None = None  # of the first byte in the file (safetensors); None for pickled weights

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


MAX_HEADER_BYTES = 100_000_000
"""safetensors refuses a longer header ("header too large"); a length beyond it means the file is not one."""

_U64_MAX = 2**64 - 1  # shapes and offsets are usize in safetensors (64-bit)
_MAX_JSON_DEPTH = 127  # serde_json's nesting limit, which safetensors' header parser inherits
_FIELDS = ("dtype", "shape", "data_offsets")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_NEGATIVE_ZERO = re.compile(r"-0(?![0-9.eE])")  # an integer literal -0, which serde_json reads as a float

FORMAT_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip
"""Bits per element of every dtype the safetensors format defines (gift-merge computes on ``dtypes.BY_CODE``)."""


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as its shard's header describes it, already checked against the file."""

    dtype: str  # the header's code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # data_offsets: relative to the first byte after the header
    end: int


class _Pairs(list[tuple[str, Any]]):
    """A JSON object's members in file order, duplicates kept, so that duplicates can be refused."""


def read_header(file: Path) -> tuple[dict[str, HeaderEntry], int]:
    """The tensors of one safetensors file and where their bytes start (8 + the header's length).

    The header is held to the rules of the safetensors library (its ``SafeTensors::read_metadata`` and
    ``Metadata::validate``): a header length within the file and at most 100 MB, UTF-8 JSON as serde_json
    reads it, ``__metadata__`` absent, null or a map of strings to strings, and tensors whose byte ranges,
    sorted, tile the data section from its first byte to the file's last, each as long as its dtype and
    shape need. A file safetensors would refuse to open is refused here, by the header and the file size
    alone, before anything is planned or written. One rule is stricter: a tensor named twice in one header
    is an error (safetensors keeps the last entry). Checked against safetensors 0.8 by a test that damages
    headers at random and compares the verdicts with ``safe_open``'s.
    """
    try:
        with open(file, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise GiftMergeError(f"{file}: not a safetensors file ({size} bytes, too short for a header)")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise GiftMergeError(
                    f"{file}: not a safetensors file (header length {length} is over safetensors' limit "
                    f"of {MAX_HEADER_BYTES})"
                )
            if 8 + length > size:
                raise GiftMergeError(f"{file}: truncated (the header needs {8 + length} bytes, the file has {size})")
            raw = handle.read(length)
    except OSError as exc:
        raise GiftMergeError(f"{file}: cannot read ({exc.strerror or exc})") from exc
    entries = _parse_header(file, raw)
    _check_layout(file, entries, 8 + length, size)
    return entries, 8 + length


def _parse_header(file: Path, raw: bytes) -> dict[str, HeaderEntry]:
    """The header's JSON, read as safetensors reads it (serde_json), and each entry's fields checked."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GiftMergeError(f"{file}: corrupt safetensors header (not UTF-8 at byte {8 + exc.start})") from None
    # the int hook costs a Python call per number, so it runs only where a "-0" may be
    parse_int = _json_int if _NEGATIVE_ZERO.search(text) else None
    try:
        document = json.loads(
            text,
            object_pairs_hook=_Pairs,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=parse_int,
        )
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, json.JSONDecodeError):
            at, why = f" at byte {8 + len(text[: exc.pos].encode())}", exc.msg
        else:
            at, why = "", "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise GiftMergeError(f"{file}: corrupt safetensors header (invalid JSON{at}: {why})") from None
    if _SURROGATE_ESCAPE.search(text) and not _encodable(document):
        raise GiftMergeError(f"{file}: corrupt safetensors header (a \\u escape is half a surrogate pair)")
    if not isinstance(document, _Pairs):
        raise GiftMergeError(f"{file}: corrupt safetensors header (expected a JSON object)")
    entries: dict[str, HeaderEntry] = {}
    seen_metadata = False
    for name, value in document:
        if name == "__metadata__":
            if seen_metadata:
                raise GiftMergeError(f"{file}: corrupt safetensors header (__metadata__ appears twice)")
            seen_metadata = True
            _check_metadata(file, value)
        elif name in entries:
            raise GiftMergeError(f"{file}: tensor {name} is described twice in the header")
        else:
            entries[name] = _plain_entry(value) or _entry(file, name, value)
    return entries


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text} out of range")
    return value


def _json_int(text: str) -> int | float:
    # serde_json reads "-0" as the float -0.0, so it is no usize there; keep it from passing as int 0 here
    value = int(text)
    return -0.0 if value == 0 and text.startswith("-") else value


def _encodable(value: Any) -> bool:
    """Whether every string in a parsed header is valid Unicode (no lone surrogate from a ``\\u`` escape)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, _Pairs):
        return all(_encodable(k) and _encodable(v) for k, v in value)
    if isinstance(value, list):
        return all(_encodable(v) for v in value)
    return True


def _depth(value: Any) -> int:
    if isinstance(value, _Pairs):
        return 1 + max((_depth(v) for _, v in value), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _check_metadata(file: Path, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, _Pairs):
        raise GiftMergeError(f"{file}: corrupt safetensors header (__metadata__ must be a map of strings)")
    for key, item in value:
        if not isinstance(item, str):
            raise GiftMergeError(
                f"{file}: corrupt safetensors header (__metadata__ value of {key!r} is not a string: {item!r})"
            )


def _plain_entry(value: Any) -> HeaderEntry | None:
    """The usual entry (the three fields once each, of their types), accepted quickly; ``None`` for anything
    else, which :func:`_entry` then checks rule by rule."""
    if type(value) is not _Pairs or len(value) != 3:
        return None
    fields = dict(value)
    dtype, shape, offsets = fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")
    if (
        type(dtype) is str
        and dtype in FORMAT_BITS
        and type(shape) is list
        and all(type(d) is int and 0 <= d <= _U64_MAX for d in shape)
        and type(offsets) is list
        and len(offsets) == 2
        and all(type(o) is int and 0 <= o <= _U64_MAX for o in offsets)
    ):
        return HeaderEntry(dtype, tuple(shape), offsets[0], offsets[1])
    return None


def _entry(file: Path, name: str, value: Any) -> HeaderEntry:
    """One tensor's entry: the three fields safetensors requires, of its types; other keys are ignored."""
    where = f"{file}: tensor {name}: corrupt header entry"
    if not isinstance(value, _Pairs):
        raise GiftMergeError(f"{where} (expected an object with dtype, shape and data_offsets)")
    fields: dict[str, Any] = {}
    for key, item in value:
        if key in _FIELDS:
            if key in fields:
                raise GiftMergeError(f"{where} ({key} appears twice)")
            fields[key] = item
        elif _depth(item) > _MAX_JSON_DEPTH - 2:
            raise GiftMergeError(f"{where} ({key} is nested too deeply)")
    missing = [key for key in _FIELDS if key not in fields]
    if missing:
        raise GiftMergeError(f"{where} (no {missing[0]})")
    dtype, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
    if not isinstance(dtype, str) or dtype not in FORMAT_BITS:
        raise GiftMergeError(f"{where} (unknown dtype {dtype!r})")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise GiftMergeError(f"{where} (shape must be a list of non-negative integers, got {shape!r})")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise GiftMergeError(f"{where} (data_offsets must be two non-negative integers, got {offsets!r})")
    return HeaderEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _is_u64(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _U64_MAX


def _entry_nbytes(file: Path, name: str, entry: HeaderEntry) -> int:
    """The bytes ``entry``'s shape and dtype need, refused where safetensors refuses them (overflow, or
    sub-byte elements that do not fill whole bytes)."""
    count = 1
    for dim in entry.shape:
        count *= dim
        if count > _U64_MAX:  # safetensors multiplies in order, with checked 64-bit products
            raise GiftMergeError(f"{file}: tensor {name}: shape {list(entry.shape)} overflows 64 bits")
    bits = count * FORMAT_BITS[entry.dtype]
    if bits > _U64_MAX:
        raise GiftMergeError(f"{file}: tensor {name}: shape {list(entry.shape)} overflows 64 bits")
    if bits % 8:
        raise GiftMergeError(f"{file}: tensor {name}: {count} {entry.dtype} elements do not fill whole bytes")
    return bits // 8


def _check_layout(file: Path, entries: dict[str, HeaderEntry], data_start: int, size: int) -> None:
    """Tensors sorted by offset must follow each other with no gap or overlap, each as long as its shape
    and dtype need, and end exactly where the file ends."""
    position, previous = 0, ""
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.end < entry.begin:
            raise GiftMergeError(
                f"{file}: tensor {name}: data_offsets [{entry.begin}, {entry.end}] end before they begin"
            )
        if data_start + entry.end > size:
            raise GiftMergeError(
                f"{file}: truncated: tensor {name} ends at byte {data_start + entry.end}, the file at byte {size}"
            )
        if entry.begin < position:
            raise GiftMergeError(
                f"{file}: tensor {name} (data bytes {entry.begin}..{entry.end}) overlaps tensor {previous} "
                f"(which ends at {position})"
            )
        if entry.begin > position:
            after = f"tensor {previous} ends at {position}" if previous else "the data section starts at 0"
            raise GiftMergeError(
                f"{file}: tensor {name} starts at data byte {entry.begin}, but {after}: "
                f"{entry.begin - position} bytes belong to no tensor"
            )
        need = _entry_nbytes(file, name, entry)
        if entry.end - entry.begin != need:
            raise GiftMergeError(
                f"{file}: tensor {name} has {entry.end - entry.begin} bytes, its shape and dtype need {need}"
            )
        position, previous = entry.end, name
    if data_start + position != size:
        raise GiftMergeError(
            f"{file}: {size - data_start - position} bytes after the last tensor's data "
            f"(the data ends at byte {data_start + position}, the file at {size}): not a valid safetensors file"
        )


def read_index(index: Path) -> dict[str, str]:
    """A sharded checkpoint's ``weight_map`` (tensor name → shard file), as transformers reads it (UTF-8 JSON)."""
    try:
        raw = index.read_bytes()
    except OSError as exc:
        raise GiftMergeError(f"{index}: cannot read ({exc.strerror or exc})") from exc
    try:
        document = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise GiftMergeError(f"{index}: not UTF-8 (byte {exc.start})") from None
    except ValueError as exc:
        raise GiftMergeError(f"{index}: invalid JSON ({exc})") from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
        raise GiftMergeError(f"{index}: not a safetensors index (expected a weight_map of tensor name → shard file)")
    return weight_map


class CheckpointReader:
    """One model folder's tensors, opened lazily and read-only; with a ``watch``, every tensor read is
    counted for NaN and ±inf (see :class:`~gift_merge.io.finite.InputWatch`)."""

    def __init__(self, folder: str | Path, *, watch: InputWatch | None = None) -> None:
        self.folder = Path(folder)
        self.watch = watch
        self._pickled_files: dict[Path, dict[str, torch.Tensor]] = {}
        self._infos = self._scan()
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()

    def _scan(self) -> dict[str, TensorInfo]:
        """Every tensor of the checkpoint transformers would load from this folder, with every header checked.

        transformers reads ``model.safetensors`` when it exists, else the shards that the index names, and
        loads every tensor those shards hold; so does this. Stricter than transformers: a tensor the index
        lists must be in the shard it names (transformers would silently initialise it at random), and a
        tensor may be in one shard only (transformers would keep whichever shard it read last).
        """
        folder = self.folder
        if not folder.is_dir():
            raise GiftMergeError(f"{folder}: no such model folder")
        index = folder / INDEX_NAME
        weight_map: dict[str, str] = {}
        if (folder / SINGLE_NAME).is_file():
            files = [folder / SINGLE_NAME]
        elif index.is_file():
            weight_map = read_index(index)
            files = [folder / shard for shard in sorted(set(weight_map.values()))]
            for file in files:
                if not file.is_file():
                    first = next(name for name, shard in weight_map.items() if folder / shard == file)
                    raise GiftMergeError(f"{index}: shard {file.name} is missing (the index puts {first} in it)")
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                bins = sorted(folder.glob("*.bin"))
                if bins and pickle_allowed():
                    return self._scan_pickled(bins)
                hint = (
                    f" (found {bins[0].name}: pickled weights can run code; convert to safetensors, or pass "
                    "--allow-pickle if you trust them)"
                    if bins
                    else ""
                )
                raise GiftMergeError(f"{folder}: no safetensors weights found{hint}")
        infos: dict[str, TensorInfo] = {}
        for file in files:
            header, data_start = read_header(file)
            for name, entry in header.items():
                dtype = BY_CODE.get(entry.dtype)
                if dtype is None:
                    raise GiftMergeError(f"{file}: tensor {name} has unsupported dtype {entry.dtype}")
                if name in infos:
                    raise GiftMergeError(
                        f"{file}: tensor {name} is also in {infos[name].file.name}; a tensor belongs in one shard"
                    )
                infos[name] = TensorInfo(name, entry.shape, dtype, file, data_start + entry.begin)
        for name, shard in weight_map.items():
            held = infos.get(name)
            if held is None or held.file != folder / shard:
                where = f", it is in {held.file.name}" if held is not None else ""
                raise GiftMergeError(f"{index}: tensor {name} is listed in {shard}, which does not hold it{where}")
        return infos

    def _scan_pickled(self, files: list[Path]) -> dict[str, TensorInfo]:
        """Opted-in ``.bin`` weights, loaded with ``weights_only`` and memory-mapped (read lazily)."""
        infos: dict[str, TensorInfo] = {}
        for file in files:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
                raise GiftMergeError(f"{file}: cannot load pickled weights ({exc})") from exc
            if not isinstance(state, dict):
                raise GiftMergeError(f"{file}: expected a state dict of tensors")
            self._pickled_files[file] = state
            for name, tensor in state.items():
                infos[name] = TensorInfo(name, tuple(tensor.shape), of(tensor.dtype), file)
        return infos

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    @property
    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise GiftMergeError(f"{self.folder}: no tensor named {name}") from None

    def read(self, name: str) -> torch.Tensor:
        """One tensor, as a view of its shard's private memory map."""
        info = self.info(name)
        if info.file in self._pickled_files:
            tensor = self._pickled_files[info.file][name].clone()
            if self.watch is not None:
                self._count(info, tensor.reshape(-1).view(torch.uint8).numpy())
            return tensor
        mapped, offset = self._checked_map(info)
        self._count_mapped(info, mapped, offset)
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype.torch)
        flat = torch.frombuffer(mapped, dtype=info.dtype.torch, count=info.numel, offset=offset)
        return flat.view(info.shape)

    def read_array(self, name: str) -> np.ndarray:
        """One tensor's bits as a numpy array (bf16 and fp8 as unsigned integers of their width), a view of
        the shard's private memory map: the torch-free merge path reads through this."""
        info = self.info(name)
        if info.file in self._pickled_files:
            tensor = self._pickled_files[info.file][name].contiguous()
            if info.dtype.storage.kind == "u" and info.dtype.is_floating_point:
                tensor = tensor.view(getattr(torch, f"int{8 * info.dtype.itemsize}"))
            bits = tensor.numpy().view(info.dtype.storage).reshape(info.shape)
            self._count(info, bits.reshape(-1).view(np.uint8))
            return bits
        mapped, offset = self._checked_map(info)
        self._count_mapped(info, mapped, offset)
        return np.frombuffer(mapped, dtype=info.dtype.storage, count=info.numel, offset=offset).reshape(info.shape)

    def _count_mapped(self, info: TensorInfo, mapped: mmap.mmap, offset: int) -> None:
        if self.watch is not None and info.numel:
            self._count(info, np.frombuffer(mapped, dtype=np.uint8, count=info.nbytes, offset=offset))

    def _count(self, info: TensorInfo, data: np.ndarray) -> None:
        """Hand the whole stored tensor (``data``: its bytes) to the watch, which counts each tensor once.

        The whole tensor, not the rows or block a caller asked for: a merge reads a large tensor a block of
        rows at a time, and the count is of the input file, so rows a vocabulary trim drops count too.
        """
        if self.watch is not None:
            self.watch.check(info.file, info.name, info.dtype, data)

    def _checked_map(self, info: TensorInfo) -> tuple[mmap.mmap, int]:
        """The shard's map and the tensor's offset in it, after checking the file holds all its bytes."""
        assert info.offset is not None
        mapped = self._map(info.file)
        if info.offset + info.nbytes > len(mapped):
            raise GiftMergeError(
                f"{info.file}: cannot read tensor {info.name} (the file ends at byte {len(mapped)}, "
                f"the tensor at {info.offset + info.nbytes}: truncated?)"
            )
        return mapped, info.offset

    def _map(self, file: Path) -> mmap.mmap:
        with self._lock:
            mapped = self._maps.get(file)
            if mapped is None:
                try:
                    with open(file, "rb") as handle:
                        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
                except (OSError, ValueError) as exc:
                    raise GiftMergeError(f"{file}: cannot map for reading ({exc})") from exc
                self._maps[file] = mapped
            return mapped

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())
