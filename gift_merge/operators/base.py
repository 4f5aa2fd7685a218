"""The contract every merge operator fulfils.

An operator is a pure function over the tensors of one output weight. The planner resolves everything
else (which model is the base, parameter gradients and filters, dtypes) before any tensor is read, so an
operator never sees a recipe, a file or a layer index: only tensors and plain numbers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import numpy as np

from gift_merge.lazy import torch


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default of a parameter the recipe must set."""

BaseRole = Literal["required", "optional", "ignored"]


@dataclass(frozen=True)
class Param:
    """One recipe parameter an operator reads.

    ``per_model`` parameters (``weight``, ``density``) have one value per input model; the others
    (``lambda``, ``normalize``, ``t``) one value per tensor. Both kinds may be gradients or filtered
    values in a recipe: the planner evaluates them to a plain value per tensor before calling ``apply``.
    ``check`` returns an error message for an out-of-range value, or ``None``.
    """

    name: str
    default: Any = REQUIRED
    per_model: bool = False
    doc: str = ""
    kind: type = float
    check: Callable[[Any], str | None] | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


Array = TypeVar("Array")
"""``torch.Tensor`` for :attr:`Operator.apply`, ``numpy.ndarray`` for :attr:`Operator.numpy`."""


@dataclass(frozen=True)
class MergeInputs(Generic[Array]):
    """Everything an operator needs to compute one output tensor.

    ``tensors`` are the inputs other than the base, in recipe order, already on the compute device and
    in the compute dtype (float32 unless the recipe says otherwise). ``model_params[i]`` holds the
    per-model parameters of ``tensors[i]`` with defaults filled in; ``params`` the per-tensor ones.
    Inputs must not be modified: the executor may hand the same tensor to several jobs (and the numpy
    path hands float32 inputs over as views of the file's memory map).
    """

    tensors: Sequence[Array]
    base: Array | None = None
    model_params: Sequence[Mapping[str, Any]] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    generator: np.random.Generator | None = None
    tensor_name: str = ""


@dataclass(frozen=True)
class StreamInputs(Generic[Array]):
    """What a streaming operator gets: inputs still in their stored dtype, flattened, never widened whole.

    ``widen`` turns a slice of any of them into the compute dtype on the compute device, exactly as the
    executor would have converted the whole tensor, so a streaming implementation can match the whole-tensor
    ``apply`` bit for bit while holding only slices in fp32. For :attr:`Operator.numpy_stream` the inputs
    are stored bits (bf16 as uint16) and ``out_dtype`` is a :class:`gift_merge.dtypes.DType`, which the
    kernel rounds to with :func:`gift_merge.floatbits.narrow`.
    """

    tensors: Sequence[Array]
    base: Array
    widen: Callable[[Array], Array]
    out_dtype: Any
    shape: tuple[int, ...] = ()  # the tensor's shape, for statistics taken along rows
    model_params: Sequence[Mapping[str, Any]] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    generator: np.random.Generator | None = None
    tensor_name: str = ""


@dataclass(frozen=True)
class Operator:
    """A registered merge method.

    ``base`` says how the recipe's ``base_model`` takes part: ``required`` (it is ``MergeInputs.base``
    and must exist), ``optional`` (``base`` when the recipe names one, else ``None``) or ``ignored``
    (no separate base: a base model listed under ``models`` is just another input).
    ``min_models``/``max_models`` count the non-base inputs. ``random`` operators get a generator seeded
    by (seed, tensor name). ``check`` validates the combination of resolved parameters for one tensor
    and returns an error message or ``None``. ``deltas`` operators receive each input's change to the
    base (an adapter's exact ΔW) instead of a full tensor, so nothing is lost to ``(θ_b + ΔW) − θ_b``.
    ``elementwise`` operators compute each entry from the same entry of the inputs, with no statistic over
    the whole tensor, so the executor may hand them matching slices of a large tensor one at a time.
    ``stream``, where given, computes the same result as ``apply`` from :class:`StreamInputs` for large
    tensors, holding whole-tensor statistics but only slices of the inputs in the compute dtype.
    ``numpy``, where given (elementwise operators only), is ``apply`` on numpy arrays (float32, or float64
    where an input carries an adapter) with the same roundings in the same order, so a merge of such
    operators can run without importing torch (``gift_merge.numpy_engine``); ``numpy_stream`` is
    ``stream`` in numpy, returning the output's bits, and serves tensors of every size. The numpy engine
    uses them wherever a whole merge allows; tests/test_numpy_path.py holds every one to the torch path's
    bytes.
    """

    name: str
    apply: Callable[[MergeInputs[torch.Tensor]], torch.Tensor]
    params: tuple[Param, ...] = ()
    base: BaseRole = "required"
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    summary: str = ""
    paper: str = ""
    check: Callable[[Mapping[str, Any], Sequence[Mapping[str, Any]]], str | None] | None = None
    deltas: bool = False
    elementwise: bool = False
    stream: Callable[[StreamInputs[torch.Tensor]], torch.Tensor] | None = None
    numpy: Callable[[MergeInputs[np.ndarray]], np.ndarray] | None = None
    numpy_stream: Callable[[StreamInputs[np.ndarray]], np.ndarray] | None = None

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    @property
    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)


def seed_for(seed: int, tensor_name: str) -> int:
    """A 63-bit seed derived from (recipe seed, tensor name)."""
    digest = hashlib.blake2b(f"{seed}\0{tensor_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator_for(seed: int, tensor_name: str) -> np.random.Generator:
    """A CPU random generator seeded by (seed, tensor name).

    Seeding per tensor makes random operators independent of execution order and thread count; drawing
    on the CPU makes the masks identical on every device. numpy's PCG64DXSM rather than torch's mt19937:
    its raw 64-bit output, read as two 32-bit draws, is 4× faster than ``torch.rand`` (DARE draws one
    number per parameter per model).
    """
    return np.random.Generator(np.random.PCG64DXSM(seed_for(seed, tensor_name)))
