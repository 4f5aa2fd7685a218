"""Reader, streaming writer and atomic output folder, against the safetensors library itself."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gift_merge.dtypes import of
from gift_merge.errors import GiftMergeError
from gift_merge.io.reader import CheckpointReader
from gift_merge.io.sizes import parse_size
from gift_merge.io.writer import OutputTensor, ShardedWriter, atomic_output_folder


def random_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(17, 9, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(33, generator=g),
        "c.weight": torch.randn(4, 4, 4, generator=g).to(torch.float16),
        "d.ids": torch.randint(0, 100, (7,), generator=g),
        "e.scalar": torch.tensor(3.5),
        "f.empty": torch.zeros(0, 5),
    }


@pytest.mark.parametrize("shard_bytes", [10**9, 300, 1])
def test_writer_round_trips_through_safetensors(tmp_path: Path, shard_bytes: int) -> None:
    tensors = random_tensors(0)
    plan = [OutputTensor(n, tuple(t.shape), of(t.dtype)) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, plan, shard_bytes)
    for name in reversed(list(tensors)):  # any completion order
        writer.write(name, tensors[name])
    writer.close()
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if shard_bytes == 10**9:
        assert files == ["model.safetensors"]
        assert not (tmp_path / "model.safetensors.index.json").exists()
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert set(index["weight_map"].values()) == set(files)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert len(files) > 1
    loaded = {}
    for file in files:
        with safe_open(str(tmp_path / file), framework="pt") as fh:
            assert fh.metadata() == {"format": "pt"}
            loaded.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)


def test_reader_reads_single_and_sharded(tmp_path: Path) -> None:
    tensors = random_tensors(1)
    single = tmp_path / "single"
    single.mkdir()
    save_file(tensors, str(single / "model.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = list(tensors)
    save_file({n: tensors[n] for n in names[:3]}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in names[3:]}, str(sharded / "model-00002-of-00002.safetensors"))
    weight_map = {n: f"model-0000{1 if i < 3 else 2}-of-00002.safetensors" for i, n in enumerate(names)}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for folder in (single, sharded):
        reader = CheckpointReader(folder)
        assert set(reader.names) == set(tensors)
        for name, tensor in tensors.items():
            assert reader.info(name).shape == tuple(tensor.shape)
            assert reader.info(name).dtype.torch == tensor.dtype
            assert torch.equal(reader.read(name), tensor)


def test_reader_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(GiftMergeError, match="no such model folder"):
        CheckpointReader(tmp_path / "missing")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(GiftMergeError, match="pickled weights can run code"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(GiftMergeError, match=r"model\.safetensors: not a safetensors file \(7 bytes"):
        CheckpointReader(tmp_path)


def test_reader_never_modifies_inputs(tmp_path: Path) -> None:
    save_file(random_tensors(2), str(tmp_path / "model.safetensors"))
    before = (tmp_path / "model.safetensors").read_bytes()
    reader = CheckpointReader(tmp_path)
    tensor = reader.read("b.bias")
    tensor += 1  # the copy is ours; the file must not change
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_atomic_folder_appears_only_on_success(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_output_folder(dest, overwrite=False) as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("boom")
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_output_folder(dest, overwrite=False) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (dest / "config.json").is_file()
    with pytest.raises(GiftMergeError, match="not empty"), atomic_output_folder(dest, overwrite=False):
        pass
    with pytest.raises(KeyboardInterrupt), atomic_output_folder(dest, overwrite=True) as tmp:
        raise KeyboardInterrupt
    assert (dest / "config.json").is_file()  # the old output survives an interrupted overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("500MB", 500 * 10**6), ("5GB", 5 * 10**9), ("5B", 5 * 10**9), ("1.5GiB", int(1.5 * 2**30)), ("2KiB", 2048),
     ("200M", 200 * 10**6), (" 20 kb ", 20_000), (123, 123)],
)  # fmt: skip
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "is not a size"), ("5XB", "unknown unit 'XB'"), ("-1GB", "is not a size"), ("0GB", "more than zero"),
     ("GB", "is not a size"), ("5", "5 has no unit; write 5GB, 500MB"), ("2048", "2048 has no unit"),
     ("0.5", "0.5 has no unit")],
)  # fmt: skip
def test_parse_size_rejects(text: str, message: str) -> None:
    with pytest.raises(GiftMergeError, match=f"^--out-shard-size: .*{re.escape(message)}"):
        parse_size(text, "--out-shard-size")


def test_pickled_weights_need_opt_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = {k: v for k, v in random_tensors(3).items() if v.numel()}
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    monkeypatch.delenv("GIFT_MERGE_ALLOW_PICKLE", raising=False)
    with pytest.raises(GiftMergeError, match="--allow-pickle"):
        CheckpointReader(tmp_path)
    monkeypatch.setenv("GIFT_MERGE_ALLOW_PICKLE", "1")
    reader = CheckpointReader(tmp_path)
    for name, tensor in tensors.items():
        assert reader.info(name).shape == tuple(tensor.shape)
        assert torch.equal(reader.read(name), tensor)


def test_reader_views_the_file_and_never_writes_to_it(tmp_path: Path) -> None:
    """Tensors are views of a private map: what safetensors saved, and in-place writes stay in memory."""
    import hashlib

    tensors = random_tensors(3)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    before = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    reader = CheckpointReader(tmp_path)
    for name, expected in tensors.items():
        got = reader.read(name)
        assert got.dtype == expected.dtype and torch.equal(got, expected), name
        if got.numel():
            got.fill_(0)  # a stray in-place write
    assert hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest() == before
    fresh = CheckpointReader(tmp_path)
    assert all(torch.equal(fresh.read(n), t) for n, t in tensors.items())


def test_reader_rejects_a_tensor_whose_bytes_do_not_match_its_shape(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["w"]["shape"] = [4, 5]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (tmp_path / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length :])
    with pytest.raises(GiftMergeError, match="tensor w has 64 bytes, its shape and dtype need 80"):
        CheckpointReader(tmp_path)
