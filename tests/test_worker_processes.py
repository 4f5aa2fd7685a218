"""Forked worker processes (the numpy engine's workers for large merges) write what threads write, report
what they find, and stop with the run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import gift_merge.engine.blocks as blocks
from gift_merge.cli import main
from gift_merge.engine.executor import PROCESSES_ENV
from tests.test_chunking import digest
from tests.test_nonfinite import fresh_rng, input_line, poisoned_bf16_copy

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="worker processes are forked on Linux only")

RECIPES = {
    "linear": "merge_method: linear\nmodels:\n  - {{model: {math}, parameters: {{weight: 0.7}}}}\n  - {{model: {code}, parameters: {{weight: 0.4}}}}\ndtype: bfloat16\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n  - {{model: {math}, parameters: {{weight: 0.6, density: 0.5}}}}\n  - {{model: {code}, parameters: {{weight: 0.5, density: 0.7}}}}\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - {{model: {math}, parameters: {{weight: 0.6, density: 0.5}}}}\n  - {{model: {code}, parameters: {{weight: 0.5, density: 0.7}}}}\n",
    "multislerp": "merge_method: multislerp\nbase_model: {base}\nmodels:\n  - {{model: {math}, parameters: {{weight: 0.6}}}}\n  - {{model: {code}, parameters: {{weight: 0.4}}}}\n",
    "karcher": "merge_method: karcher\nmodels:\n  - model: {base}\n  - model: {math}\n  - model: {code}\n",
}


def run(recipe: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["run", str(recipe), str(out), "-q", "--workers", "2", *extra])


@pytest.mark.parametrize("method", list(RECIPES))
def test_worker_processes_write_the_bytes_threads_write(
    tmp_path: Path, llama: dict[str, Path], method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPES[method].format(**llama))
    monkeypatch.setattr(blocks, "CHUNK_FROM", 1)  # many blocks per tensor, so jobs interleave their writes
    monkeypatch.setattr(blocks, "ELEMENTWISE_CHUNK", 777)
    outputs = {}
    for label, chosen in (("threads", "0"), ("processes", "1")):
        monkeypatch.setenv(PROCESSES_ENV, chosen)
        result = run(recipe, tmp_path / label, "--seed", "3")
        assert result.exit_code == 0, result.output
        outputs[label] = digest(tmp_path / label)
    assert outputs["threads"] == outputs["processes"]
    provenance = [json.loads((tmp_path / label / "gift_merge.json").read_text()) for label in outputs]
    assert provenance[0] == provenance[1]


def test_worker_processes_report_non_finite_inputs_and_outputs_as_threads_do(
    tmp_path: Path, llama: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rng, seed = fresh_rng()
    models = {"math": tmp_path / "math", "code": tmp_path / "code"}
    planted = poisoned_bf16_copy(rng, llama["math"], models["math"], 2)
    planted |= poisoned_bf16_copy(rng, llama["code"], models["code"], 1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPES["linear"].format(**models))
    expected = sorted(input_line(shard, name, counts, 0).split(" (")[0] for (shard, name), counts in planted.items())
    said: dict[str, list[str]] = {}
    for label, chosen in (("threads", "0"), ("processes", "1")):
        monkeypatch.setenv(PROCESSES_ENV, chosen)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gift_merge"):
            result = run(recipe, tmp_path / label)
        assert result.exit_code == 0, (seed, result.output)
        said[label] = sorted(r.getMessage() for r in caplog.records)
    assert said["threads"] == said["processes"], seed
    inputs = sorted(line.split(" (")[0] for line in said["processes"] if " in the input " in line)
    assert inputs == expected, seed
    assert any(" in the output " in line for line in said["processes"]), seed


def test_an_error_in_a_worker_process_is_one_line_and_leaves_nothing(
    tmp_path: Path, llama: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    rng, seed = fresh_rng()
    models = {"math": tmp_path / "math", "code": tmp_path / "code"}
    planted = poisoned_bf16_copy(rng, llama["math"], models["math"], 1)
    poisoned_bf16_copy(rng, llama["code"], models["code"], 0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPES["linear"].format(**models))
    monkeypatch.setenv(PROCESSES_ENV, "1")
    result = run(recipe, tmp_path / "out", "--strict")
    assert result.exit_code == 2, (seed, result.output)
    ((shard, name),) = planted
    assert f"{shard}: tensor {name}: " in result.output and "nothing was written (--strict)" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code", "math", "r.yaml"]  # no output, no leftovers


SLOW_RUN = """
import sys, time
from gift_merge.engine import compute

def slow(self, job, writer):  # every job takes a minute: the run is still computing when it is stopped
    time.sleep(60)

compute.MethodEngine.compute = slow
from gift_merge.cli import main
sys.argv = ["gift-merge", "run", sys.argv[1], sys.argv[2], "-q", "--workers", "2"]
main()
"""


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(c) for c in path.read_text().split()} if path.exists() else set()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_slow_run(tmp_path: Path, llama: dict[str, Path]) -> tuple[subprocess.Popen[str], set[int]]:
    script = tmp_path / "slow.py"
    script.write_text(textwrap.dedent(SLOW_RUN))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPES["linear"].format(**llama))
    env = {**os.environ, PROCESSES_ENV: "1"}
    process = subprocess.Popen(
        [sys.executable, str(script), str(recipe), str(tmp_path / "out")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    workers: set[int] = set()
    while len(workers) < 2 and time.monotonic() < deadline:  # the two workers, and the pool's queue feeder
        time.sleep(0.1)
        workers = {pid for pid in _children(process.pid) if "python" in Path(f"/proc/{pid}/comm").read_text()}
    assert len(workers) >= 2, process.communicate(timeout=5)
    return process, workers


def _gone(pids: set[int]) -> bool:
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(_alive(pid) for pid in pids)


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_stopping_a_run_stops_its_worker_processes_and_leaves_nothing(
    tmp_path: Path, llama: dict[str, Path], how: str
) -> None:
    process, workers = _start_slow_run(tmp_path, llama)
    if how == "sigterm":
        process.send_signal(signal.SIGTERM)
    else:  # Ctrl-C on a terminal reaches the whole foreground process group
        os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == (143 if how == "sigterm" else 130), stderr
    assert "Traceback" not in stderr, stderr  # the workers do not print their own interrupt
    assert _gone(workers)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]


def test_worker_processes_die_with_a_killed_run(tmp_path: Path, llama: dict[str, Path]) -> None:
    process, workers = _start_slow_run(tmp_path, llama)
    process.kill()
    process.communicate(timeout=60)
    assert _gone(workers)
