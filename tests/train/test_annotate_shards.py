"""Annotation split over shards or torchrun processes writes the bytes of one process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gift_merge.cli import main
from gift_merge.train import AnnotateConfig, annotate, annotation_shards
from tests.train.conftest import NUMINA

# 256 tokens cut some rows, not all, so batches pad: their rows' last bits depend on the batch they are in.
MAX_LENGTH = 256
BATCH = 3


def _options(tiny: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--quiet",
        "annotate",
        "--instruct",
        str(tiny["instruct"]),
        "--data",
        str(NUMINA),
        "--out",
        str(out),
        "--max-length",
        str(MAX_LENGTH),
        "--batch-size",
        str(BATCH),
        "--device",
        "cpu",
        *extra,
    ]


def _single(tiny: dict[str, Path], out: Path, batch_size: int = BATCH) -> bytes:
    config = AnnotateConfig(str(tiny["instruct"]), str(NUMINA), str(out), max_length=MAX_LENGTH, batch_size=batch_size)
    return annotate(config.replace(device="cpu"), quiet=True).read_bytes()


@pytest.fixture
def small_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows of 2 batches (6 rows): the 24 rows make 4 windows, so shards cross window boundaries."""
    monkeypatch.setattr(annotation_shards, "WINDOW_BATCHES", 2)


def test_scores_depend_on_the_batch(tiny: dict[str, Path], tmp_path: Path, small_windows: None) -> None:
    # Why shards split batches, not rows: the same rows batched otherwise differ in the last bits.
    assert _single(tiny, tmp_path / "b3.jsonl") != _single(tiny, tmp_path / "b1.jsonl", batch_size=1)


def test_shards_join_into_the_bytes_of_one_run(tiny: dict[str, Path], tmp_path: Path, small_windows: None) -> None:
    expected = _single(tiny, tmp_path / "single.jsonl")
    runner = CliRunner()
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()

    result = runner.invoke(main, _options(tiny, a / "out.jsonl", "--num-shards", "2", "--shard", "1"))
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, _options(tiny, b / "out.jsonl", "--num-shards", "2", "--shard", "0"))
    assert result.exit_code == 0, result.output
    assert not (a / "out.jsonl").exists() and not (b / "out.jsonl").exists()  # each waits for the other shard

    result = runner.invoke(main, _options(tiny, b / "out.jsonl", "--num-shards", "2", "--combine"))
    assert result.exit_code == 2
    assert result.output == f"error: {b / 'out.jsonl.shard-1-of-2'}: missing; annotate --shard 1 first\n"

    # Shards made elsewhere (another machine), copied together and joined.
    for name in ("out.jsonl.shard-0-of-2", "out.jsonl.shard-0-of-2.json"):
        shutil.copy(b / name, a / name)
    result = runner.invoke(main, _options(tiny, a / "out.jsonl", "--num-shards", "2", "--combine"))
    assert result.exit_code == 0, result.output
    assert (a / "out.jsonl").read_bytes() == expected
    assert sorted(p.name for p in a.iterdir()) == ["out.jsonl"]  # shard files and temporaries gone

    # The shard that completes the set joins them itself.
    result = runner.invoke(main, _options(tiny, b / "out.jsonl", "--num-shards", "2", "--shard", "1"))
    assert result.exit_code == 0, result.output
    assert (b / "out.jsonl").read_bytes() == expected
    assert sorted(p.name for p in b.iterdir()) == ["out.jsonl"]


def test_a_resumed_shard_rescores_its_window_whole(tiny: dict[str, Path], tmp_path: Path, small_windows: None) -> None:
    expected = _single(tiny, tmp_path / "single.jsonl")
    config = AnnotateConfig(
        str(tiny["instruct"]), str(NUMINA), str(tmp_path / "out.jsonl"), max_length=MAX_LENGTH, batch_size=BATCH
    ).replace(device="cpu", num_shards=3, shard=0)
    shard = annotate(config, quiet=True)
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.rename(shard.with_name(shard.name + ".partial"))  # killed inside its second window
    shard.with_name(shard.name + ".partial").write_bytes(b"".join(lines[:4]) + lines[4][:30])
    assert annotate(config, quiet=True) == shard
    assert shard.read_bytes().splitlines(keepends=True) == lines
    annotate(config.replace(shard=2), quiet=True)
    assert annotate(config.replace(shard=1), quiet=True) == tmp_path / "out.jsonl"
    assert (tmp_path / "out.jsonl").read_bytes() == expected


def test_shards_of_other_settings_are_not_joined(tiny: dict[str, Path], tmp_path: Path, small_windows: None) -> None:
    runner = CliRunner()
    out = tmp_path / "out.jsonl"
    assert runner.invoke(main, _options(tiny, out, "--num-shards", "2", "--shard", "0")).exit_code == 0
    result = runner.invoke(main, [*_options(tiny, out, "--num-shards", "2", "--shard", "1"), "--batch-size", "2"])
    assert result.exit_code == 2
    assert result.output == (
        f"error: {tmp_path / 'out.jsonl.shard-0-of-2'}: made with another batch_size (3, not 2); "
        "delete it and annotate --shard 0 again\n"
    )
    assert not out.exists()


def test_a_damaged_shard_leaves_no_output(tiny: dict[str, Path], tmp_path: Path, small_windows: None) -> None:
    runner = CliRunner()
    out = tmp_path / "out.jsonl"
    assert runner.invoke(main, _options(tiny, out, "--num-shards", "2", "--shard", "0")).exit_code == 0
    shard = tmp_path / "out.jsonl.shard-0-of-2"
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.write_bytes(b"".join(lines[:-1]))  # its last row lost
    result = runner.invoke(main, _options(tiny, out, "--num-shards", "2", "--shard", "1"))
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {shard}: ends before input line ")
    assert result.output.endswith("; annotate its shard again\n") and result.output.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{shard.name}{s}" for s in ("", ".json")] + [
        f"out.jsonl.shard-1-of-2{s}" for s in ("", ".json")
    ]  # no OUT, no temporary file


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num-shards", "2", "--shard", "2"], "--shard: must be one of 0 … 1 for --num-shards 2, got 2"),
        (
            ["--shard", "1"],
            "--shard: give --num-shards N with it (the shard's index among N jobs), got --shard 1 alone",
        ),
        (["--num-shards", "2", "--shard", "-1"], "--shard: must be one of 0 … 1 for --num-shards 2, got -1"),
        (["--num-shards", "0"], "--num-shards: must be > 0, got 0"),
        (["--num-shards", "2"], "--num-shards: give --shard I (0 … 1) to score one shard, or --combine"),
        (["--combine"], "--combine: give the number of shards to join (--num-shards N)"),
        (
            ["--num-shards", "2", "--shard", "0", "--combine"],
            "--combine: cannot be combined with --shard; join the shards once each is done",
        ),
        (["--num-shards", "2", "--shard", "x"], None),  # click's own usage error
    ],
)
def test_bad_shard_options_fail_in_one_line(
    tiny: dict[str, Path], tmp_path: Path, extra: list[str], message: str | None
) -> None:
    result = CliRunner().invoke(main, _options(tiny, tmp_path / "out.jsonl", *extra))
    assert result.exit_code == 2
    if message is not None:
        assert result.output == f"error: {message}\n"
    assert not list(tmp_path.iterdir())


def test_combine_names_shards_of_another_count(tiny: dict[str, Path], tmp_path: Path) -> None:
    for shard in range(3):
        (tmp_path / f"out.jsonl.shard-{shard}-of-3").write_text("")
    result = CliRunner().invoke(main, _options(tiny, tmp_path / "out.jsonl", "--num-shards", "2", "--combine"))
    assert result.exit_code == 2
    missing = tmp_path / "out.jsonl.shard-0-of-2"
    assert result.output == f"error: {missing}: missing; annotate --shard 0 first (found shards of --num-shards 3)\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow  # two fresh Python processes import torch and transformers
def test_torchrun_writes_the_bytes_of_one_process(tiny: dict[str, Path], tmp_path: Path) -> None:
    expected = _single(tiny, tmp_path / "single.jsonl")  # one thread, as torchrun gives each process
    out = tmp_path / "ddp.jsonl"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "gift_merge.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launch, *_options(tiny, out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.jsonl", "single.jsonl"]

    # Shards of separate jobs do not mix with the launcher's own split.
    again = subprocess.run(
        [*launch, *_options(tiny, tmp_path / "x.jsonl", "--num-shards", "2", "--shard", "0")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert again.returncode != 0
    assert "error: --num-shards: not under torchrun, which splits the rows over its 2 processes" in again.stderr
