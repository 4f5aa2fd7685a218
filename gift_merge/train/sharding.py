"""FSDP for base models that do not fit one device: each decoder layer sharded over the ranks.

``--fsdp`` under ``torchrun`` or ``accelerate launch`` applies torch's own FSDP2
(:func:`torch.distributed.fsdp.fully_shard`) to every decoder layer and then to the whole model, so each
rank holds 1/world of the frozen base weights, of LoRA and of AdamW's state, and gathers one layer's
weights while that layer runs. There is no mixed-precision policy: every weight is gathered and
computed in its own dtype (the base in ``--dtype``, LoRA in float32) and gradients are reduced in
float32, as DistributedDataParallel does, so the two paths train the same adapter.

Sharded parameters are DTensors. What leaves the loop (the adapter, checkpoints, the logged gradient
norm) is gathered into plain tensors by :func:`full` on every rank; LoRA and its optimizer state are a
small fraction of the model, so gathering them whole is cheap. A checkpoint therefore has the same
format whichever way it was trained, and :func:`shard_like` cuts a loaded one back into this rank's share.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


def layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The classes of ``model``'s decoder layers: those transformers never splits across devices.

    transformers names them in ``_no_split_modules`` (``LlamaDecoderLayer``, ``GPT2Block`` …); a model
    without that list is searched for classes named ``*DecoderLayer``.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        found = {type(m) for m in model.modules() if type(m).__name__.endswith("DecoderLayer")}
    return found


def shard(module: nn.Module, layers: set[type[nn.Module]], device: torch.device, world: int) -> nn.Module:
    """Apply FSDP2 to each layer of ``module`` whose class is in ``layers``, then to ``module`` itself.

    The parameters may be on the CPU: ``fully_shard`` moves each group to ``device`` as it shards it, so
    the device never holds more than one layer's full weights (the root group's embeddings and head
    being the largest).
    """
    mesh = init_device_mesh(device.type, (world,))
    wrapped = [m for m in module.modules() if type(m) in layers]
    if not wrapped:
        log.warning(
            "--fsdp: found no decoder layers to shard one by one; the whole model is gathered at once in "
            "each forward and backward"
        )
    for layer in wrapped:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    log.info("--fsdp: %d layer(s) and the rest of the model sharded over %d ranks", len(wrapped), world)
    return module


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every rank must call it), else ``tensor`` itself."""
    if isinstance(tensor, DTensor):
        return tensor.full_tensor()
    return tensor


def shard_like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's share of the whole ``tensor``, placed as ``param`` is (a collective when sharded)."""
    if isinstance(param, DTensor):
        return distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements)
    return tensor


def full_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered whole (in a fixed order)."""
    per_param = {
        index: {key: full(value) if isinstance(value, torch.Tensor) else value for key, value in entry.items()}
        for index, entry in sorted(state["state"].items())
    }
    return {**state, "state": per_param}


def shard_optimizer_state(state: dict[str, Any], params: Sequence[torch.Tensor]) -> dict[str, Any]:
    """A whole ``optimizer.state_dict()`` cut into this rank's shares of ``params`` (its param order)."""

    def cut(value: Any, param: torch.Tensor) -> Any:
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            return shard_like(value, param)
        return value  # AdamW's step count, a scalar

    per_param = {
        index: {key: cut(value, params[index]) for key, value in entry.items()}
        for index, entry in sorted(state["state"].items())
    }
    return {**state, "state": per_param}


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce this backward's gradients over the ranks only when ``enabled`` (the step's last micro-batch).

    The others accumulate locally, as one process accumulates: DDP's ``no_sync``, FSDP2's
    ``set_requires_gradient_sync``; nothing to do for a single process.
    """
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(enabled)
        yield
    elif isinstance(module, DistributedDataParallel) and not enabled:
        with module.no_sync():
            yield
    else:
        yield
