"""Lazy, read-only access to safetensors checkpoints, single-file or sharded.

Only the headers are parsed up front (a few kilobytes per shard), so a plan over a 70B model costs
nothing. A tensor is a view of its shard's memory map, made when a job asks for it: no copy, and its
pages are the kernel's page cache, not the process's own memory. The map is private (copy-on-write), so
even a stray in-place write could never reach the file.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gift_merge.dtypes import BY_CODE, DType, of
from gift_merge.errors import GiftMergeError
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
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def read_header(file: Path) -> tuple[dict[str, dict], int]:
    """The JSON header of one safetensors file (tensor name → dtype, shape, offsets) and where the tensor
    bytes start (8 + the header's length)."""
    try:
        with open(file, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100_000_000:
                raise ValueError("header length is implausible")
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise GiftMergeError(f"{file}: not a readable safetensors file ({exc})") from exc
    header.pop("__metadata__", None)
    return header, 8 + length


class CheckpointReader:
    """One model folder's tensors, opened lazily and read-only."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._pickled_files: dict[Path, dict[str, torch.Tensor]] = {}
        self._infos = self._scan()
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()

    def _scan(self) -> dict[str, TensorInfo]:
        folder = self.folder
        if not folder.is_dir():
            raise GiftMergeError(f"{folder}: no such model folder")
        index = folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise GiftMergeError(f"{index}: not a valid safetensors index ({exc})") from exc
            files = sorted({folder / f for f in weight_map.values()})
        elif (folder / SINGLE_NAME).is_file():
            files, weight_map = [folder / SINGLE_NAME], {}
        else:
            files, weight_map = sorted(folder.glob("*.safetensors")), {}
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
            if not file.is_file():
                raise GiftMergeError(f"{index}: shard {file.name} is missing")
            header, data_start = read_header(file)
            for name, entry in header.items():
                dtype = BY_CODE.get(entry["dtype"])
                if dtype is None:
                    raise GiftMergeError(f"{file}: tensor {name} has unsupported dtype {entry['dtype']}")
                if weight_map and weight_map.get(name) != file.name:
                    continue  # the index is authoritative where shards overlap
                begin, end = entry["data_offsets"]
                info = TensorInfo(name, tuple(entry["shape"]), dtype, file, data_start + begin)
                if end - begin != info.nbytes:
                    raise GiftMergeError(
                        f"{file}: tensor {name} has {end - begin} bytes, its shape and dtype need {info.nbytes}"
                    )
                infos[name] = info
        missing = set(weight_map) - set(infos)
        if missing:
            raise GiftMergeError(f"{index}: tensor {sorted(missing)[0]} is listed but not in its shard")
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
            return self._pickled_files[info.file][name].clone()
        mapped, offset = self._checked_map(info)
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
            return tensor.numpy().view(info.dtype.storage).reshape(info.shape)
        mapped, offset = self._checked_map(info)
        return np.frombuffer(mapped, dtype=info.dtype.storage, count=info.numel, offset=offset).reshape(info.shape)

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
