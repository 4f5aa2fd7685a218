"""Runs that must not destroy data: one writer per output, no output over an input, clean SIGTERM,
no leftovers from dead runs."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gift_merge.cli import main

LINEAR = """
merge_method: linear
models:
  - model: {math}
    parameters: {{weight: 0.5}}
  - model: {code}
    parameters: {{weight: 0.5}}
"""


def _recipe(tmp_path: Path, fam: dict[str, Path]) -> Path:
    path = tmp_path / "linear.yaml"
    path.write_text(LINEAR.format(**{k: str(v) for k, v in fam.items()}))
    return path


def _run(*args: str):
    return CliRunner().invoke(main, ["run", *args])


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture
def sleeper():
    """A live process whose id a lock can name."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


def test_a_second_run_into_a_locked_output_refuses(tmp_path: Path, llama: dict[str, Path], sleeper: int) -> None:
    out = tmp_path / "out"
    (tmp_path / ".out.lock").write_text(str(sleeper))
    result = _run(str(_recipe(tmp_path, llama)), str(out))
    assert result.exit_code == 2
    assert f"another gift-merge run (process {sleeper}) is writing this output" in result.output
    assert not out.exists()
    assert (tmp_path / ".out.lock").read_text() == str(sleeper)  # the holder's lock is left alone


def test_a_dead_runs_lock_and_temporary_folders_are_taken_over(
    tmp_path: Path, llama: dict[str, Path], sleeper: int
) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    (tmp_path / ".out.lock").write_text(str(dead.pid))
    stale = tmp_path / f".out.partial-{dead.pid}"
    (stale / "sub").mkdir(parents=True)
    live = tmp_path / f".out.partial-{sleeper}"
    live.mkdir()
    result = _run(str(_recipe(tmp_path, llama)), str(out))
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file()
    assert not stale.exists() and live.exists()  # only folders of processes that no longer run go
    assert not (tmp_path / ".out.lock").exists()


@pytest.mark.parametrize("where", ["parent", "same", "inside", "symlink"])
def test_overwrite_never_replaces_an_input(tmp_path: Path, llama: dict[str, Path], where: str) -> None:
    models = tmp_path / "models"
    shutil.copytree(llama["math"], models / "math")
    shutil.copytree(llama["code"], models / "code")
    fam = {"math": models / "math", "code": models / "code"}
    before = _tree_digest(models)
    out = {"parent": models, "same": models / "math", "inside": models / "math" / "merged"}.get(where)
    if where == "symlink":
        out = tmp_path / "link"
        out.symlink_to(models, target_is_directory=True)
    result = _run(str(_recipe(tmp_path, fam)), str(out), "--overwrite")
    assert result.exit_code == 2
    assert "input" in result.output and len(result.output.strip().splitlines()) == 1
    assert _tree_digest(models) == before


def test_sigterm_removes_the_temporary_folder(
    tmp_path: Path, llama: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import gift_merge.merge as merge

    real = merge.execute_plan

    def terminated_midway(plan, folder, **kwargs):
        real(plan, folder, **kwargs)
        assert any(folder.iterdir())  # tensors were written into the temporary folder
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(merge, "execute_plan", terminated_midway)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        result = _run(str(_recipe(tmp_path, llama)), str(tmp_path / "out"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 143
    assert "terminated: no output was written" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linear.yaml"]


def test_disk_full_is_one_line_and_leaves_nothing(
    tmp_path: Path, llama: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import gift_merge.io.writer as writer

    def full(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer.os, "pwrite", full)
    result = _run(str(_recipe(tmp_path, llama)), str(tmp_path / "out"))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and ".safetensors" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linear.yaml"]


def test_an_unreadable_file_is_one_line(
    tmp_path: Path, llama: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from gift_merge import merge

    def unreadable(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "secret.safetensors"))

    monkeypatch.setattr(merge, "execute_plan", unreadable)
    result = _run(str(_recipe(tmp_path, llama)), str(tmp_path / "out"))
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {tmp_path / 'secret.safetensors'}: Permission denied"


def test_a_non_utf8_train_config_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_bytes(b"train:\n  base: caf\xe9\n")
    result = CliRunner().invoke(main, ["train", "--config", str(config)])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {config}: not UTF-8 (byte at offset 18); save the file as UTF-8"


def test_a_disk_too_small_refuses_before_merging(
    tmp_path: Path, llama: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import gift_merge.io.disk as disk

    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))  # type: ignore[attr-defined]
    result = _run(str(_recipe(tmp_path, llama)), str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "the merged model needs" in result.output and "0.00 GB free" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linear.yaml"]
    plan = CliRunner().invoke(main, ["plan", str(_recipe(tmp_path, llama))])
    assert plan.exit_code == 0 and "# disk: the outputs need" in plan.output


def test_peak_in_flight_replays_the_executors_admission_rule() -> None:
    from gift_merge.engine.executor import peak_in_flight

    assert peak_in_flight([5, 5, 5, 5], workers=1, budget=100) == 10  # at most workers + 1 jobs at once
    assert peak_in_flight([5, 5, 5, 5], workers=2, budget=100) == 15
    assert peak_in_flight([60, 60, 10], workers=4, budget=100) == 70  # the second 60 waits for the first
    assert peak_in_flight([150, 10], workers=4, budget=100) == 150  # a job past the budget runs alone
    assert peak_in_flight([], workers=2) == 0
