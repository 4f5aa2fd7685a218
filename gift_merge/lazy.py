"""Imports deferred to first use, so the CLI starts, and torch-free merges run, without importing torch.

``import torch`` costs 2.5–3.5 s on a small CPU machine, longer than a whole linear merge of a 0.5B
model on the numpy path. Modules on the planning and merging path therefore take torch from here::

    from gift_merge.lazy import torch

It is the real module to type checkers, and at run time a stand-in that imports torch on its first
attribute access (``torch.float32``, ``torch.Tensor``), inside a function that needs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any


def lazy_getattr(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports each name in ``homes`` from its module when first asked for."""

    def __getattr__(name: str) -> Any:
        if name in homes:
            return getattr(importlib.import_module(homes[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


class LazyModule:
    """A module imported on its first attribute access; each attribute is then cached on the stand-in."""

    def __init__(self, name: str) -> None:
        self._lazy_name = name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(importlib.import_module(self._lazy_name), attr)
        setattr(self, attr, value)
        return value

    def __repr__(self) -> str:
        return f"<lazy module {self._lazy_name!r}>"


if TYPE_CHECKING:
    import torch as torch
else:
    torch = LazyModule("torch")
