"""The command line as a user meets it: errors, refusals, atomic output, determinism, inspection."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from gift_merge.cli import main
from gift_merge.errors import GiftMergeError
from gift_merge.operators import OPERATORS

TIES = """
merge_method: ties
base_model: {base}
models:
  - model: {math}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {code}
    parameters: {{weight: 0.5, density: 0.5}}
"""


def write(tmp_path: Path, text: str, fam: dict[str, Path], name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.format(**{k: str(v) for k, v in fam.items()}))
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def corrupted_copy(src: Path, dst: Path) -> Path:
    """A copy whose first shard keeps its header but loses its tensor bytes."""
    shutil.copytree(src, dst)
    shard = sorted(dst.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    shard.write_bytes(data[: 8 + header_len + 4])
    return dst


def test_bad_key_is_one_line_exit_2(tmp_path: Path, llama: dict[str, Path]) -> None:
    recipe = write(
        tmp_path, TIES.replace("density: 0.5}}\n  - model: {code}", "desnity: 0.5}}\n  - model: {code}"), llama
    )
    result = invoke("run", str(recipe), str(tmp_path / "out"))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert "models[0].parameters.desnity" in lines[0] and "did you mean 'density'" in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    debug = CliRunner().invoke(main, ["--debug", "run", str(recipe), str(tmp_path / "out")])
    assert isinstance(debug.exception, GiftMergeError)


def test_out_of_range_parameter_names_tensor_and_model(tmp_path: Path, llama: dict[str, Path]) -> None:
    recipe = write(
        tmp_path, TIES.replace("density: 0.5}}\n  - model: {code}", "density: 1.5}}\n  - model: {code}"), llama
    )
    result = invoke("validate", str(recipe))
    assert result.exit_code == 2
    assert "density" in result.output and str(llama["math"]) in result.output and "tensor model." in result.output


def test_missing_required_weight(tmp_path: Path, llama: dict[str, Path]) -> None:
    recipe = write(
        tmp_path,
        TIES.replace("weight: 0.5, density: 0.5}}\n  - model: {code}", "density: 0.5}}\n  - model: {code}"),
        llama,
    )
    result = invoke("validate", str(recipe))
    assert result.exit_code == 2
    assert "'weight' is required" in result.output


def test_truncated_shard_fails_every_command_before_output(tmp_path: Path, llama: dict[str, Path]) -> None:
    planned = invoke("plan", str(write(tmp_path, TIES, llama, "intact.yaml")))
    assert planned.exit_code == 0
    assert "model.layers.2.mlp.down_proj.weight  ties" in planned.output
    # a shard that lost its tensor bytes is refused when opened, from its header and size alone
    broken = corrupted_copy(llama["code"], tmp_path / "broken")
    recipe = write(tmp_path, TIES, {**llama, "code": broken})
    for args in (["validate", str(recipe)], ["plan", str(recipe)], ["run", str(recipe), str(tmp_path / "out"), "-q"]):
        result = invoke(*args)
        assert result.exit_code == 2
        assert "broken" in result.output and "truncated" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "intact.yaml", "r.yaml"]


def test_existing_output_is_refused_then_replaced(tmp_path: Path, llama: dict[str, Path]) -> None:
    recipe = write(tmp_path, TIES, llama)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = invoke("run", str(recipe), str(out))
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "precious.txt").read_text() == "keep me"
    assert invoke("run", str(recipe), str(out), "--overwrite", "-q").exit_code == 0
    assert not (out / "precious.txt").exists() and (out / "config.json").is_file()


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_interrupted_merge_leaves_no_output(
    tmp_path: Path, llama: dict[str, Path], monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    from gift_merge.io.writer import TensorSink

    calls = {"n": 0}
    real = TensorSink.write  # every slice of every output tensor goes through it

    def interrupt_later(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(TensorSink, "write", interrupt_later)
    recipe = write(tmp_path, TIES, llama)
    result = invoke("run", str(recipe), str(tmp_path / "out"), "-q", "--workers", "1", "--engine", engine)
    assert result.exit_code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_output_may_not_be_an_input(tmp_path: Path, llama: dict[str, Path]) -> None:
    recipe = write(tmp_path, TIES, llama)
    before = digest(llama["math"])
    result = invoke("run", str(recipe), str(llama["math"]), "--overwrite")
    assert result.exit_code == 2 and "the output folder is or contains input" in result.output
    assert digest(llama["math"]) == before


def test_output_from_recipe_relative_to_recipe(tmp_path: Path, llama: dict[str, Path]) -> None:
    sub = tmp_path / "recipes"
    sub.mkdir()
    recipe = write(sub, TIES + "output: ../merged/ties\n", llama)
    assert invoke("run", str(recipe), "-q").exit_code == 0
    assert (tmp_path / "merged" / "ties" / "config.json").is_file()
    assert invoke("run", str(write(sub, TIES, llama, "x.yaml"))).exit_code == 2


DARE = """
merge_method: dare_ties
base_model: {base}
models:
  - model: {math}
    parameters: {{weight: 0.6, density: 0.4}}
  - model: {code}
    parameters: {{weight: 0.6, density: 0.7}}
"""


def test_random_methods_same_bytes_for_same_seed_any_thread_count(tmp_path: Path, llama: dict[str, Path]) -> None:
    recipe = write(tmp_path, DARE, llama)
    runs = {}
    for label, extra in {"w1": ["--workers", "1"], "w4": ["--workers", "4"], "seed9": ["--seed", "9"]}.items():
        assert invoke("run", str(recipe), str(tmp_path / label), "-q", *extra).exit_code == 0
        runs[label] = digest(tmp_path / label)
    assert runs["w1"] == runs["w4"]
    assert runs["w1"]["model.safetensors"] != runs["seed9"]["model.safetensors"]


def test_methods_lists_the_registry(tmp_path: Path) -> None:
    result = invoke("methods")
    assert result.exit_code == 0
    for op in OPERATORS.values():
        assert f"{op.name}:" in result.output
        for param in op.params:
            assert f"    {param.name} (" in result.output


def test_inspect(llama: dict[str, Path]) -> None:
    result = invoke("inspect", str(llama["base"]))
    assert result.exit_code == 0
    assert "model.layers.0.self_attn.q_proj.weight\t[64, 64]\tfloat32\t16384" in result.output
    assert invoke("inspect", "/nonexistent/model").exit_code == 2


def test_missing_recipe_file(tmp_path: Path) -> None:
    result = invoke("validate", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and "nope.yaml" in result.output


def test_unavailable_device_and_offline_hub_fail_cleanly(tmp_path: Path, llama: dict[str, Path]) -> None:
    import torch

    recipe = write(tmp_path, TIES, llama)
    if not torch.cuda.is_available():
        result = invoke("run", str(recipe), str(tmp_path / "out"), "--device", "cuda")
        assert result.exit_code == 2 and "CUDA is not available" in result.output
    hub = write(tmp_path, TIES.replace("{math}", "some-org/not-on-this-machine"), llama, "hub.yaml")
    result = CliRunner().invoke(main, ["validate", str(hub)], env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 2
    assert "some-org/not-on-this-machine" in result.output and len(result.output.strip().splitlines()) == 1


def test_the_cli_loads_without_torch() -> None:
    """`gift-merge --help` (and every command's parsing) must not wait for torch's import."""
    import subprocess
    import sys

    code = "import sys, gift_merge.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False False"


def test_a_closed_pipe_is_not_an_error() -> None:
    """`gift-merge methods | head -1`: the listing stops quietly when its reader has gone (here the reader
    is gone before the first line, so every run meets the broken pipe)."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "gift_merge.cli", "methods"], stdout=write_end, stderr=subprocess.PIPE, text=True
        )
    finally:
        os.close(write_end)
    assert result.stderr == "" and result.returncode == 141
