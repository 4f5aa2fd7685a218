"""The PEFT adapter on disk: ``adapter_model.safetensors`` and ``adapter_config.json``.

The factors' shapes are only known once each SVD has run (a delta may have a lower rank than asked
for), so the safetensors header cannot be written first as :class:`~gift_merge.io.writer.ShardedWriter`
does. Instead each tensor's bytes are appended to a spool file the moment they exist, and the final
file is the header followed by a streamed copy of the spool: peak memory is one module's factors,
whatever the model size.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from gift_merge.dtypes import of
from gift_merge.errors import GiftMergeError
from gift_merge.io.adapter import pattern_key
from gift_merge.io.writer import OutputTensor, header_bytes  # same header layout as merged checkpoints


class AdapterWriter:
    """Collects named tensors in arrival order into one safetensors file, holding none of them.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with AdapterWriter(Path(d) / "a.safetensors") as w:
    ...         w.add("x", torch.ones(2, 3))
    ...     from safetensors.torch import load_file
    ...     load_file(Path(d) / "a.safetensors")["x"].shape
    torch.Size([2, 3])
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._spool_path = path.with_name(path.name + ".spool")
        self._spool = open(self._spool_path, "wb")  # noqa: SIM115  # closed in close()/abort()
        self._tensors: list[OutputTensor] = []
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise GiftMergeError(f"adapter tensor {name} written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        self._spool.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
        self._tensors.append(OutputTensor(name, tuple(tensor.shape), of(tensor.dtype)))
        self._names.add(name)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tensors)

    def close(self) -> None:
        """Write header + data; the spool is removed."""
        self._spool.close()
        header, _ = header_bytes(self._tensors)
        with open(self.path, "wb") as out, open(self._spool_path, "rb") as spool:
            out.write(header)
            shutil.copyfileobj(spool, out, length=16 << 20)
        self._spool_path.unlink()

    def abort(self) -> None:
        self._spool.close()
        self._spool_path.unlink(missing_ok=True)

    def __enter__(self) -> AdapterWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def target_modules(targets: Sequence[str], all_modules: Iterable[str]) -> list[str]:
    """peft's ``target_modules``: leaf names when they pick exactly ``targets``, else full names.

    peft matches a list entry by equality or as a ``.suffix``. ``["q_proj", "v_proj"]`` reads well and
    is what trainers write, but it is only right when every module with those leaf names is a target
    (no ``--include`` picking some layers, no module left out as unchanged).
    """
    chosen = set(targets)
    leaves = {t.rpartition(".")[2] for t in chosen}
    by_leaf = {m for m in all_modules if m.rpartition(".")[2] in leaves}
    return sorted(leaves) if by_leaf == chosen else sorted(chosen)


def rank_patterns(ranks: dict[str, int], r: int) -> dict[str, int]:
    """``rank_pattern`` for modules below the adapter's ``r``, keyed by module name.

    Keys are plain module names (what mergekit writes and simple readers expect); peft reads them as
    regexes, so they are checked to resolve, under peft's first-match rule, to exactly the intended rank
    for every target, and escaped if any would not.
    """
    plain = {m: k for m, k in ranks.items() if k != r}
    for keys in (plain, {re.escape(m): k for m, k in plain.items()}):
        if all(_peft_rank(keys, module, r) == k for module, k in ranks.items()):
            return keys
    raise AssertionError("escaped rank_pattern keys must resolve to their own modules")


def _peft_rank(pattern: dict[str, int], module: str, r: int) -> int:
    """The rank peft gives ``module``: its ``rank_pattern`` entry (by the reader's rule), else ``r``."""
    key = pattern_key(pattern, module)
    return pattern[key] if key is not None else r


def adapter_config(
    *,
    base_model: str,
    ranks: dict[str, int],
    all_modules: Iterable[str],
    modules_to_save: Sequence[str],
    fan_in_fan_out: bool,
    lora_bias: bool,
    ensure_weight_tying: bool,
) -> dict[str, Any]:
    """A LoRA config peft loads as is: alpha = rank for every module, so every scale α/r is exactly 1."""
    r = max(ranks.values())
    pattern = rank_patterns(ranks, r)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": target_modules(list(ranks), all_modules),
        "modules_to_save": list(modules_to_save) or None,
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "lora_bias": lora_bias,
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    if ensure_weight_tying:
        config["ensure_weight_tying"] = True
    return config
