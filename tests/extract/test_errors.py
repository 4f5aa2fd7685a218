"""User errors are one line naming the tensor or option, exit code 2, and leave no output folder."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file

from gift_merge.cli import main
from gift_merge.errors import GiftMergeError
from gift_merge.extract import ExtractOptions, extract_lora
from tests.extract.conftest import RANK
from tests.extract.peft_check import adapter
from tests.reference import load_all

Q = "model.layers.1.self_attn.q_proj.weight"


def edited_copy(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> Path:
    tensors = load_all(src)
    edit(tensors)
    dst.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / "model.safetensors")
    shutil.copyfile(src / "config.json", dst / "config.json")
    return dst


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, ["extract-lora", *args])


def test_cli_writes_adapter_and_prints_table(bases: dict[str, Path], exact: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    result = invoke("--base", str(bases["llama"]), "--tuned", str(exact["llama"]), "--rank", "6",
                    "--rank-pattern", "mlp=2", "--exclude", "layers\\.2\\.", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "energy kept" in result.output and "model.layers.0.mlp.up_proj" in result.output
    config, _, report = adapter(out)
    assert config["r"] == RANK and set(config["rank_pattern"].values()) == {2}
    assert not any("layers.2." in t for t in config["target_modules"])
    assert report["settings"]["rank_pattern"] == ["mlp=2"] and report["settings"]["versions"]["peft"]
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "extraction_report.json",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rank", "0"], "--rank 0: must be a positive integer"),
        (["--rank", "-3"], "--rank -3: must be a positive integer"),
        (["--rank", "4", "--rank-pattern", "mlp=0"], "--rank-pattern mlp=0: rank must be a positive integer"),
        (["--rank", "4", "--rank-pattern", "mlp"], "--rank-pattern mlp: expected REGEX=RANK"),
        (["--rank", "4", "--rank-pattern", "mlpp=2"], "--rank-pattern mlpp=2: sets the rank of no LoRA module"),
        (["--rank", "4", "--include", "("], "--include (: not a valid regular expression"),
        (["--rank", "4", "--include", "nothing_here"], "--include nothing_here: matches no Linear module"),
        (["--rank", "4", "--exclude", "."], "no module selected for LoRA extraction"),
        (["--rank", "4", "--dtype", "int8"], "--dtype: unknown dtype 'int8'"),
    ],
)
def test_bad_options(
    args: list[str], message: str, bases: dict[str, Path], exact: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "adapter"
    result = invoke("--base", str(bases["llama"]), "--tuned", str(exact["llama"]), *args, str(out))
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and message in result.output, result.output
    assert not out.exists()


def test_mismatched_shape_names_the_tensor(bases: dict[str, Path], tmp_path: Path) -> None:
    def widen(t: dict[str, torch.Tensor]) -> None:
        t[Q] = torch.zeros(t[Q].shape[0], t[Q].shape[1] + 1)

    tuned = edited_copy(bases["llama"], tmp_path / "tuned", widen)
    with pytest.raises(GiftMergeError, match=rf"tensor {Q}: shape \[64, 65\] in .* but \[64, 64\] in base"):
        extract_lora(str(bases["llama"]), str(tuned), tmp_path / "out", ExtractOptions(rank=4, quiet=True))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("side", ["base", "tuned"])
def test_missing_tensor_names_it(side: str, bases: dict[str, Path], exact: dict[str, Path], tmp_path: Path) -> None:
    edited = edited_copy(exact["llama"], tmp_path / "edited", lambda t: t.pop(Q))
    base, tuned = (str(edited), str(exact["llama"])) if side == "base" else (str(bases["llama"]), str(edited))
    result = invoke("--base", base, "--tuned", tuned, "--rank", "4", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert f"error: tensor {Q}: in " in result.output and "but missing from" in result.output
    assert str(edited) in result.output
    assert not (tmp_path / "out").exists()


def test_failure_midway_leaves_nothing(
    bases: dict[str, Path], exact: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gift_merge.extract.run as run

    calls = []

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 5:
            raise GiftMergeError("tensor boom: simulated failure")
        return real(*args, **kwargs)

    real = run.truncated_svd
    monkeypatch.setattr(run, "truncated_svd", failing)
    out = tmp_path / "out"
    with pytest.raises(GiftMergeError, match="simulated"):
        extract_lora(str(bases["llama"]), str(exact["llama"]), out, ExtractOptions(rank=4, quiet=True))
    assert list(tmp_path.iterdir()) == []  # neither the adapter nor a partial folder


def test_identical_models_are_refused(bases: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(GiftMergeError, match="identical in every module chosen for LoRA"):
        extract_lora(str(bases["gpt2"]), str(bases["gpt2"]), tmp_path / "out", ExtractOptions(rank=4, quiet=True))
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(bases: dict[str, Path], exact: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["--base", str(bases["qwen2"]), "--tuned", str(exact["qwen2"]), "--rank", "4", str(out)]
    result = invoke(*args)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "keep.txt").exists()
    assert invoke(*args, "--overwrite", "-q").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "adapter_config.json").exists()
