"""The adapter folder: PEFT's own files, the training log and ``gift.json``, all or nothing.

``adapter_config.json`` + ``adapter_model.safetensors`` are written by peft's ``save_pretrained``, so
``PeftModel.from_pretrained(base, folder)`` loads them and gift-merge's adapter reader (``merge_method:
gift``) transfers them. ``gift.json`` records how the adapter was made, for the merged model's card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gift_merge.io import artifacts
from gift_merge.io.writer import atomic_output_folder

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

LOG_NAME = "training_log.jsonl"
PROVENANCE_NAME = "gift.json"


def versions() -> dict[str, str]:
    found = artifacts.package_versions("gift-merge", "torch", "transformers", "peft")
    return {package: found_version or "unknown" for package, found_version in found.items()}


def write_adapter(
    out: Path,
    model: PeftModel,
    *,
    log: list[dict[str, Any]],
    provenance: dict[str, Any],
    overwrite: bool,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the adapter, its log and provenance into a temporary folder, then rename it to ``out``.

    ``state_dict`` (whole tensors, named as in ``model``) replaces the model's own, whose tensors are
    this rank's shards when the model is sharded; peft keeps the LoRA tensors of either.
    """
    with atomic_output_folder(out, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
        (tmp / LOG_NAME).write_text("".join(json.dumps(record) + "\n" for record in log))
        (tmp / PROVENANCE_NAME).write_text(json.dumps({**provenance, "versions": versions()}, indent=2) + "\n")
        artifacts.write_adapter_card(tmp, provenance, log)  # replaces peft's empty template
    return out.resolve()
