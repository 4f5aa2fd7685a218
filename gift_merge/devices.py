"""Device names as the command line spells them, checked in one place for every command."""

from __future__ import annotations

from gift_merge.errors import GiftMergeError
from gift_merge.lazy import torch


def torch_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:1`` … as a torch device; a malformed name or a CUDA device on a machine
    without one is a one-line error naming ``--device``, before any model is read."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise GiftMergeError(f"--device {name}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GiftMergeError(f"--device {name}: CUDA is not available on this machine")
    return device
