"""``gift-merge upload``: a finished output to the Hugging Face Hub, through ``huggingface_hub``.

Beside :mod:`gift_merge.io.locate`, the only module that reaches the network. An output is uploaded only
when it is complete: not a temporary folder, not being written (its lock), and with weights that open
(every header checked as when merging), so a half-written or damaged model never reaches a repository.
"""

from __future__ import annotations

from pathlib import Path

from gift_merge.errors import GiftMergeError
from gift_merge.io.locks import lock_path, pid_alive

INTERNAL_FILES = ["gift_merge_inputs.json", "gift-merge-build.json", ".*"]
"""Bookkeeping for reuse on this machine, not part of the model."""


def check_complete(folder: Path) -> str:
    """``"model"`` or ``"adapter"`` for a complete output; otherwise one line saying what is missing."""
    from gift_merge.io.reader import CheckpointReader, read_header

    folder = folder.resolve()
    if not folder.is_dir():
        raise GiftMergeError(f"{folder}: no such folder")
    if folder.name.startswith(".") and (".partial-" in folder.name or ".old-" in folder.name):
        raise GiftMergeError(f"{folder}: a temporary folder of a run, not a finished output")
    lock = lock_path(folder)
    if lock.is_file():
        holder = lock.read_text().strip()
        if holder.isdigit() and pid_alive(int(holder)):
            raise GiftMergeError(f"{folder}: process {holder} is still writing it; upload when it is done")
    if (folder / "adapter_config.json").is_file():
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise GiftMergeError(f"{folder}: adapter_config.json without adapter_model.safetensors")
        read_header(weights)
        return "adapter"
    if not (folder / "config.json").is_file():
        raise GiftMergeError(f"{folder}: no config.json or adapter_config.json: not a model or adapter output")
    reader = CheckpointReader(folder)  # every shard present, every header valid
    if not reader.names:
        raise GiftMergeError(f"{folder}: no weights")
    return "model"


def upload(folder: Path, repo_id: str, *, private: bool, revision: str | None, message: str | None) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` to it; return the commit's URL."""
    kind = check_complete(folder)
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            commit_message=message or f"Upload {kind} made with gift-merge",
            ignore_patterns=INTERNAL_FILES,
        )
    except GiftMergeError:
        raise
    except Exception as exc:  # network, authentication and permission errors all mean the same to the user
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GiftMergeError(f"{repo_id}: upload failed: {first_line}") from exc
    return str(getattr(commit, "commit_url", commit))
