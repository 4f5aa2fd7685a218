"""The merge operators, one registry table.

``OPERATORS`` maps each method name to its :class:`Operator`; documentation, ``--help`` and
``gift-merge methods`` are derived from it. Add an operator by writing its module and listing its object
in ``_ALL`` below; a duplicate name fails at import time.

Example::

    >>> from gift_merge.operators import get_operator
    >>> get_operator("ties").base
    'required'
"""

from __future__ import annotations

import difflib

from gift_merge.errors import GiftMergeError

from .arcee_fusion import ARCEE_FUSION
from .base import REQUIRED, BaseRole, MergeInputs, Operator, Param, generator_for
from .breadcrumbs import BREADCRUMBS, BREADCRUMBS_TIES
from .dare import DARE_LINEAR, DARE_TIES
from .della import DELLA, DELLA_LINEAR
from .gift import GIFT, LORA_TRANSFER
from .iso import ISO_C, ISO_CTS
from .karcher import KARCHER
from .linear import LINEAR
from .model_stock import MODEL_STOCK
from .multislerp import MULTISLERP
from .nearswap import NEARSWAP
from .nuslerp import NUSLERP
from .passthrough import PASSTHROUGH
from .ram import RAM, RAMPLUS_TL
from .sce import SCE
from .slerp import SLERP
from .task_arithmetic import TASK_ARITHMETIC
from .ties import TIES
from .tsv import TSV

__all__ = [
    "OPERATORS",
    "REQUIRED",
    "BaseRole",
    "MergeInputs",
    "Operator",
    "Param",
    "generator_for",
    "get_operator",
]

_ALL: tuple[Operator, ...] = (
    LINEAR,
    TASK_ARITHMETIC,
    TIES,
    DARE_LINEAR,
    DARE_TIES,
    BREADCRUMBS,
    BREADCRUMBS_TIES,
    DELLA,
    DELLA_LINEAR,
    SLERP,
    NUSLERP,
    MULTISLERP,
    KARCHER,
    MODEL_STOCK,
    NEARSWAP,
    SCE,
    ARCEE_FUSION,
    RAM,
    RAMPLUS_TL,
    TSV,
    ISO_C,
    ISO_CTS,
    PASSTHROUGH,
    GIFT,
    LORA_TRANSFER,
)


def _register(operators: tuple[Operator, ...]) -> dict[str, Operator]:
    """Name → operator; two operators with one name is a programming error, raised at import."""
    table: dict[str, Operator] = {}
    for op in operators:
        if op.name in table:
            raise ValueError(f"duplicate merge operator name {op.name!r}")
        table[op.name] = op
    return table


OPERATORS: dict[str, Operator] = _register(_ALL)


def get_operator(name: str) -> Operator:
    """The operator called ``name``; an unknown name raises :class:`GiftMergeError` with a suggestion."""
    try:
        return OPERATORS[name]
    except KeyError:
        close = difflib.get_close_matches(name, OPERATORS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known methods: {', '.join(sorted(OPERATORS))}"
        raise GiftMergeError(f"unknown merge method {name!r}{hint}") from None
