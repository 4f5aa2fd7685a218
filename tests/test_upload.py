"""``gift-merge upload``: only complete outputs reach the Hub; the Hub calls are those huggingface_hub documents."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
from click.testing import CliRunner

from gift_merge.cli import main


class FakeHub:
    """Records the calls gift-merge makes on ``huggingface_hub.HfApi``, with no network."""

    calls: ClassVar[list[tuple[str, dict]]] = []

    def create_repo(self, repo_id: str, **kwargs: object) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_branch(self, repo_id: str, **kwargs: object) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs: object) -> object:
        files = sorted(p.name for p in Path(str(kwargs["folder_path"])).iterdir())
        self.calls.append(("upload_folder", {**kwargs, "files": files}))
        return type("Commit", (), {"commit_url": "https://hub.invalid/commit/1"})()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> type[FakeHub]:
    import huggingface_hub

    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub


def test_a_merged_model_is_uploaded(hub: type[FakeHub], llama: dict[str, Path]) -> None:
    result = CliRunner().invoke(main, ["upload", str(llama["math"]), "me/merged", "--private", "--revision", "v1"])
    assert result.exit_code == 0, result.output
    assert "uploaded: https://hub.invalid/commit/1" in result.output
    names = [name for name, _ in hub.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[0][1] == {"repo_id": "me/merged", "private": True, "exist_ok": True}
    upload = hub.calls[2][1]
    assert upload["repo_id"] == "me/merged" and upload["revision"] == "v1"
    assert "gift_merge_inputs.json" in upload["ignore_patterns"]


@pytest.mark.parametrize("damage", ["missing_shard", "partial", "locked", "empty"])
def test_incomplete_outputs_are_refused(
    hub: type[FakeHub], llama: dict[str, Path], tmp_path: Path, damage: str
) -> None:
    folder = tmp_path / "out"
    shutil.copytree(llama["math"], folder)
    holder = None
    if damage == "missing_shard":
        sorted(folder.glob("model-*.safetensors"))[0].unlink()
    elif damage == "partial":
        folder = folder.rename(tmp_path / f".out.partial-{os.getpid()}")
    elif damage == "locked":
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        (tmp_path / ".out.lock").write_text(str(holder.pid))
    elif damage == "empty":
        shutil.rmtree(folder)
        folder.mkdir()
    try:
        result = CliRunner().invoke(main, ["upload", str(folder), "me/merged"])
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert hub.calls == []


def test_hub_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, llama: dict[str, Path]) -> None:
    import huggingface_hub

    class Refusing(FakeHub):
        def create_repo(self, repo_id: str, **kwargs: object) -> None:
            raise RuntimeError("401 Client Error: Unauthorized\nmore detail")

    monkeypatch.setattr(huggingface_hub, "HfApi", Refusing)
    result = CliRunner().invoke(main, ["upload", str(llama["math"]), "me/merged"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: me/merged: upload failed: 401 Client Error: Unauthorized"
