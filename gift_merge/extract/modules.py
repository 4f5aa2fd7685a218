"""Which module owns each checkpoint tensor, and what kind of layer it is, as peft will see it.

PEFT wraps *modules* of the model that ``AutoModelForCausalLM`` builds, and how it applies B·A depends
on the module's class: ``nn.Linear`` stores its weight [out, in], GPT-2's ``Conv1D`` stores it [in, out]
(peft's ``fan_in_fan_out``), ``nn.Embedding`` stores it [vocab, dim] and takes ``lora_embedding_A/B``.
Tensor names cannot tell these apart (``c_attn.weight`` and ``q_proj.weight`` look alike), so we build
the model from its config on the ``meta`` device (no memory, no weights, well under a second) and ask
it. That also gives the names peft will use, which can differ from the checkpoint's (GPT-2 checkpoints
saved without the ``transformer.`` prefix) and tells us whether the output head is tied.

For an architecture transformers cannot build, the kinds are guessed from tensor names and shapes
(every 2-D weight is a Linear, vocab-named ones are embeddings); ``exact`` is then False.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from gift_merge.architecture import is_vocab_tensor

log = logging.getLogger(__name__)

ModuleKind = Literal["linear", "conv1d", "embedding", "other"]


@dataclass(frozen=True)
class ModelModules:
    """The modules of one architecture that own checkpoint tensors."""

    kinds: dict[str, ModuleKind]  # module name (as peft names it) → kind
    param_of: dict[str, str]  # checkpoint tensor name → "<module>.<param>" in the transformers model
    all_modules: tuple[str, ...]  # every module name in the model, for checking peft's suffix matching
    input_embedding: str | None  # module name of the token embedding
    head: str | None  # module name of the output head (lm_head)
    tied_head: bool  # the head shares the embedding's weight and has no tensor of its own
    exact: bool  # False when kinds were guessed from tensor names

    def module_of(self, tensor: str) -> tuple[str, str] | None:
        """``(module, param)`` for a checkpoint tensor; None if the model has no such parameter."""
        full = self.param_of.get(tensor)
        if full is None:
            return None
        module, _, param = full.rpartition(".")
        return module, param


def describe_modules(folder: Path, shapes: Mapping[str, tuple[int, ...]]) -> ModelModules:
    """Module kinds for the checkpoint in ``folder`` whose tensors have ``shapes`` (name → shape)."""
    names = list(shapes)
    try:
        model = _meta_model(folder)
    except Exception as exc:  # unknown model_type, remote code, not a causal LM: all mean "guess instead"
        log.warning(
            "%s: transformers cannot build this architecture (%s); guessing layer types from names", folder, exc
        )
        return _guess(shapes)
    return _from_model(model, names)


def _meta_model(folder: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from gift_merge.hf_quiet import quiet_transformers  # imports transformers: only when a model is built

    # Only the shapes matter here; transformers' messages about building the model would be noise.
    with quiet_transformers(logs=True):
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):  # shapes only: a 70B model costs nothing here
            return AutoModelForCausalLM.from_config(config)


def _kind(module: torch.nn.Module) -> ModuleKind:
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D (GPT-2 family), [in, out]
        return "conv1d"
    return "other"


def _from_model(model: torch.nn.Module, names: list[str]) -> ModelModules:
    modules = dict(model.named_modules(remove_duplicate=False))
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    prefix = getattr(model, "base_model_prefix", "")
    param_of: dict[str, str] = {}
    for name in names:
        for candidate in (name, f"{prefix}.{name}" if prefix else name):
            if candidate in params:
                param_of[name] = candidate
                break
    kinds: dict[str, ModuleKind] = {}
    for full in param_of.values():
        module = full.rpartition(".")[0]
        kinds[module] = _kind(modules[module])
    ids = {id(m): n for n, m in modules.items()}
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_in() if get_in else None
    head = get_out() if get_out else None
    emb_name = ids.get(id(emb)) if emb is not None else None
    head_name = ids.get(id(head)) if head is not None else None
    tied = (
        head is not None
        and emb is not None
        and head.weight is emb.weight
        and f"{head_name}.weight" not in param_of.values()
    )
    return ModelModules(kinds, param_of, tuple(n for n in modules if n), emb_name, head_name, tied, exact=True)


def _guess(shapes: Mapping[str, tuple[int, ...]]) -> ModelModules:
    kinds: dict[str, ModuleKind] = {}
    head = emb = None
    for name, shape in shapes.items():
        module, _, param = name.rpartition(".")
        leaf = module.rpartition(".")[2]
        if param != "weight":
            kinds.setdefault(module, "other")  # a bias never decides the kind; its weight does
            continue
        if len(shape) != 2:
            kinds[module] = "other"
        elif leaf in ("lm_head", "embed_out"):
            kinds[module], head = "linear", module
        elif is_vocab_tensor(name) or "wpe" in leaf or "embed_positions" in leaf:
            kinds[module] = "embedding"
            emb = emb or (module if is_vocab_tensor(name) else None)
        else:
            kinds[module] = "linear"
    return ModelModules(
        kinds=kinds,
        param_of={n: n for n in shapes},
        all_modules=tuple(sorted({n.rpartition(".")[0] for n in shapes})),
        input_embedding=emb,
        head=head,
        tied_head=False,
        exact=False,
    )
