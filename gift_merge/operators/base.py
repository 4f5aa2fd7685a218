"""The contract every merge operator fulfils.

An operator is a pure function over the tensors of one output weight. The planner resolves everything
else (which model is the base, parameter gradients and filters, dtypes) before any tensor is read, so an
operator never sees a recipe, a file or a layer index: only tensors and plain numbers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar

import numpy as np

from gift_merge.dtypes import FLOAT32, FLOAT64, DType
from gift_merge.engine import blocks

if TYPE_CHECKING:
    from gift_merge.engine.backend import Backend


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default of a parameter the recipe must set."""

BaseRole = Literal["required", "optional", "ignored"]

Memory = Literal["slices", "stream_cuts", "cuts", "held", "whole"]
"""What a method holds besides a few slices (the engine's working-set model): ``slices`` nothing more;
``stream_cuts`` a float32 |δ| buffer and a bool mask per model while they fit the job's buffer limit, else
nothing more (the cut streams); ``cuts`` those buffers always (arcee_fusion's importance buffer); ``held``
one tensor-sized array per model and one more between passes while they fit the job's buffer limit
(:class:`~gift_merge.operators.held.Held`), else nothing more; ``whole`` every input whole, in float32."""


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
"""``numpy.ndarray`` on the CPU backend, ``torch.Tensor`` on a device backend."""


@dataclass(frozen=True)
class MergeInputs(Generic[Array]):
    """One block of an elementwise method's inputs (:func:`elementwise`): the same entries of every input.

    ``tensors`` are the inputs other than the base, in recipe order, on the backend's device and in the
    math dtype (float32 unless an input is float64). ``model_params[i]`` holds the per-model parameters of
    ``tensors[i]`` with defaults filled in; ``params`` the per-tensor ones. Inputs must not be modified:
    float32 inputs are views of the file's memory map.
    """

    tensors: Sequence[Array]
    base: Array | None = None
    model_params: Sequence[Mapping[str, Any]] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    generator: np.random.Generator | None = None
    tensor_name: str = ""
    backend: Any = None  # the Backend the arrays belong to, for methods that call more than operators


CHUNK = 1 << 18
"""Entries per flat slice a method reads at a time: 1 MB of float32, cache-resident, and even (so random
draws taken slice by slice consume the generator exactly as one whole draw)."""


def cut_bytes(numel: int, models: int) -> int:
    """What a cut decided on buffers holds: a float32 |δ| and a bool mask per model."""
    return numel * (4 + models)


NO_LIMIT = 1 << 62
"""A buffer limit no tensor reaches."""

Read = TypeVar("Read", covariant=True)


class Source(Protocol[Read]):
    """One input of one output tensor, read a flat slice at a time in the math dtype (float32, or float64
    for float64 inputs), with its adapter's change already applied. What ``read`` returns may be a view of
    the file: methods never modify it in place."""

    def read(self, part: slice) -> Read: ...


class Sink(Protocol):
    """Where finished output entries go: one tensor's place in the writer (`io.writer.TensorSink`)."""

    def write(self, start: int, values: Any) -> None: ...


class Output(Generic[Array]):
    """The output tensor, filled a slice at a time in its stored dtype; ``write`` rounds math values.

    With a ``sink`` (a merge's), each slice goes to disk as soon as it is rounded, through one reused block
    buffer, so no output tensor is ever whole in memory; without one the slices fill ``values`` (tests)."""

    def __init__(self, backend: Backend, count: int, dtype: DType, sink: Sink | None = None) -> None:
        self.backend = backend
        self.dtype = dtype
        self.sink = sink
        self.values: Any = backend.output(count, dtype) if sink is None else None
        self._block: Any = None

    def write(self, part: slice, values: Array) -> None:
        if self.sink is None:
            self.backend.store(values, self.dtype, self.values[part])
            return
        count = part.stop - part.start
        if self._block is None or len(self._block) < count:
            self._block = self.backend.output(count, self.dtype)
        block = self._block[:count]
        self.backend.store(values, self.dtype, block)
        self.sink.write(part.start, self.backend.to_writer(block))


@dataclass(frozen=True)
class Operands(Generic[Array]):
    """One output tensor's merge as a method sees it: its inputs as :class:`Source` objects (``sources``
    in recipe order, then ``base``), its shape, the parameters resolved for it, a generator for random
    methods, the :class:`Backend` to compute with and the :class:`Output` to fill.

    A method reads its inputs in slices (:meth:`chunks`, or :meth:`row_chunks` for whole rows), so no
    input is ever widened whole; a method that needs a whole-tensor statistic (a magnitude cut, a norm,
    an inner product) takes it in a first pass over slices and mixes in a second.
    """

    sources: Sequence[Source[Array]]
    base: Source[Array] | None
    shape: tuple[int, ...]
    backend: Backend
    out: Output[Array]
    model_params: Sequence[Mapping[str, Any]] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    generator: np.random.Generator | None = None
    tensor_name: str = ""
    buffer_limit: int = NO_LIMIT
    """Bytes this tensor's method may hold in tensor-sized buffers (a |δ| buffer, masks): the engine's share
    of the memory budget. A cut that does not fit streams its inputs again instead
    (:func:`~.gta.streamed_threshold`)."""
    math_dtype: DType = FLOAT32
    """The dtype the job computes in: float32, or float64 where an input reads float64 (a float64
    checkpoint, a recipe's ``dtype: float64``, a model patched by an adapter; :class:`Source`), and so
    where the τ, variances and importances between inputs are float64."""

    def cuts_fit(self) -> bool:
        """Whether this tensor's cut buffers (:func:`cut_bytes`) stay within :attr:`buffer_limit`."""
        return cut_bytes(self.numel, len(self.sources)) <= self.buffer_limit

    def selects_on_buffer(self) -> bool:
        """Whether an order-statistic cut (a magnitude, variance or importance quantile) is taken on a
        tensor-sized buffer of its values: while the cut buffers fit, and always for float64 values, which
        the radix passes (:func:`~gift_merge.engine.selection.streamed_kth_largest`, over float32 bits) do
        not read."""
        return self.cuts_fit() or self.math_dtype == FLOAT64

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def chunks(self, size: int | None = None) -> Iterator[slice]:
        """Flat slices of ``size`` entries (:data:`CHUNK` unless given), in order."""
        size = size or CHUNK
        for start in range(0, self.numel, size):
            yield slice(start, min(start + size, self.numel))

    def row_chunks(self) -> Iterator[slice]:
        """Flat slices of whole rows, :mod:`gift_merge.engine.blocks`' blocks: the blocks an adapter's ΔW is formed
        in, so elementwise methods see the same ΔW bits whatever else runs."""
        width = self.numel // self.shape[0] if self.shape and self.shape[0] else 1
        for rows in blocks.row_blocks(self.shape):
            start = (rows.start or 0) * width
            yield slice(start, min(rows.stop * width, self.numel) if self.shape else self.numel)

    def row_pieces(self) -> Iterator[slice]:
        """The blocks of :meth:`row_chunks` cut into cache-sized pieces (:data:`~gift_merge.engine.blocks.PIECE`),
        in order: what an elementwise mix computes at once. Sources serve any slice within one block (an
        adapter's ΔW is still formed a whole block at a time)."""
        for part in self.row_chunks():
            yield from blocks.pieces(part)


def elementwise(mix: Callable[[MergeInputs[Any]], Any]) -> Callable[[Operands[Any]], None]:
    """A method whose every output entry depends only on the same entry of its inputs, as a merge: ``mix``
    (written once, for one block of values) applied to each block of rows."""

    def merge(operands: Operands[Any]) -> None:
        base = operands.base
        for part in operands.row_pieces():
            block = MergeInputs(
                tensors=[source.read(part) for source in operands.sources],
                base=base.read(part) if base is not None else None,
                model_params=operands.model_params,
                params=operands.params,
                tensor_name=operands.tensor_name,
                backend=operands.backend,
            )
            operands.out.write(part, mix(block))

    merge.__module__, merge.__name__, merge.__doc__ = mix.__module__, mix.__name__, mix.__doc__
    return merge


@dataclass(frozen=True)
class Operator:
    """A registered merge method.

    ``merge`` is the method's only implementation: it fills ``Operands.out`` from ``Operands``' sources,
    slice by slice, on whichever backend the engine gives it. ``base`` says how the recipe's ``base_model``
    takes part: ``required`` (it is ``Operands.base`` and must exist), ``optional`` (``base`` when the
    recipe names one, else ``None``) or ``ignored`` (no separate base: a base model listed under
    ``models`` is just another input). ``min_models``/``max_models`` count the non-base inputs.
    ``random`` methods get a generator seeded by (seed, tensor name). ``check`` validates the combination
    of resolved parameters for one tensor and returns an error message or ``None``. ``deltas`` methods
    receive each input's change to the base (an adapter's exact ΔW) instead of a full tensor, so nothing is
    lost to ``(θ_b + ΔW) − θ_b``. ``elementwise`` methods compute each entry from the same entry of the
    inputs and read them in blocks of whole rows, so an adapter's ΔW is formed a block of rows at a time.
    ``work`` gives how a tensor's time grows with its shape, in units its seconds are proportional to
    (``None``: its entries); an SVD merge's grows as m·n·min(m, n). ``workspace`` gives the bytes a
    ``whole`` method allocates for one tensor beyond its inputs (decompositions' factors and workspace).
    ``ignores`` names parameters mergekit's recipes carry for this method although mergekit declares none
    of that name for it and so ignores them: the loader accepts them anywhere and drops them with a log
    line, so such a recipe runs unchanged; every other unknown parameter stays an error.
    """

    name: str
    merge: Callable[[Operands[Any]], None]
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
    memory: Memory = "slices"
    work: Callable[[tuple[int, ...]], float] | None = None
    workspace: Callable[[tuple[int, ...]], int] | None = None
    ignores: tuple[str, ...] = ()

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
