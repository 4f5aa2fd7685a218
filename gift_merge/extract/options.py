"""What the user asked for: ranks, module selection, and what to do with embeddings and vectors."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from gift_merge.errors import GiftMergeError
from gift_merge.extract.svd import SvdMethod

EmbeddingMode = Literal["skip", "lora", "save"]
EMBEDDING_MODES: tuple[EmbeddingMode, ...] = ("skip", "lora", "save")


@dataclass(frozen=True)
class ExtractOptions:
    """Settings of one extraction; :meth:`check` turns every bad value into a one-line error.

    Every regex is searched (``re.search``) in module names such as ``model.layers.0.mlp.up_proj``.
    ``rank_pattern`` holds ``(regex, rank)`` pairs, the first that matches wins (``mlp`` or
    ``layers\\.0\\.``); the adapter config then lists each module by full name, so peft's own suffix rule
    for ``rank_pattern`` keys never has to agree with ours. ``include`` replaces the default choice of
    Linear/Conv1D modules inside the transformer layers; ``exclude`` removes modules from everything written.

    >>> ExtractOptions(rank=16, rank_pattern=(("mlp", 8),)).check()
    """

    rank: int
    rank_pattern: tuple[tuple[str, int], ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    embeddings: EmbeddingMode = "skip"
    save_undecomposable: bool = False
    dtype: torch.dtype | None = None  # of the A/B factors; None keeps each tuned tensor's float dtype
    device: str = "cpu"
    svd: SvdMethod = "auto"
    seed: int = 0
    overwrite: bool = False
    quiet: bool = False

    def check(self) -> None:
        if self.rank < 1:
            raise GiftMergeError(f"--rank {self.rank}: must be a positive integer")
        for regex, rank in self.rank_pattern:
            _compile(regex, f"--rank-pattern {regex}={rank}")
            if rank < 1:
                raise GiftMergeError(f"--rank-pattern {regex}={rank}: rank must be a positive integer")
        for option, regexes in (("--include", self.include), ("--exclude", self.exclude)):
            for regex in regexes:
                _compile(regex, f"{option} {regex}")
        if self.embeddings not in EMBEDDING_MODES:
            raise GiftMergeError(f"--embeddings {self.embeddings}: expected one of {', '.join(EMBEDDING_MODES)}")
        if self.svd not in ("auto", "full", "randomized"):
            raise GiftMergeError(f"--svd {self.svd}: expected auto, full or randomized")
        if self.dtype is not None and not self.dtype.is_floating_point:
            raise GiftMergeError(f"--dtype {self.dtype}: adapter factors need a floating-point dtype")

    def pattern_rank(self, module: str) -> tuple[int, str | None]:
        """The module's maximum rank and the ``--rank-pattern`` regex that set it (None: ``--rank``)."""
        for regex, rank in self.rank_pattern:
            if re.search(regex, module):
                return rank, regex
        return self.rank, None

    def included(self, module: str, *, default: bool) -> bool:
        """Whether a LoRA-able module is chosen: by ``include`` when given, else ``default``."""
        return any(re.search(r, module) for r in self.include) if self.include else default

    def excluded(self, module: str) -> bool:
        return any(re.search(r, module) for r in self.exclude)


def parse_rank_pattern(text: str) -> tuple[str, int]:
    """``'regex=rank'`` → ``(regex, rank)``; the last ``=`` splits, so regexes may contain one.

    >>> parse_rank_pattern(r"layers\\.0\\..*=4")
    ('layers\\\\.0\\\\..*', 4)
    """
    regex, sep, rank = text.rpartition("=")
    if not sep or not regex:
        raise GiftMergeError(f"--rank-pattern {text}: expected REGEX=RANK, e.g. 'mlp=8'")
    try:
        value = int(rank)
    except ValueError:
        raise GiftMergeError(f"--rank-pattern {text}: rank {rank!r} is not an integer") from None
    return regex, value


def _compile(regex: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(regex)
    except re.error as exc:
        raise GiftMergeError(f"{where}: not a valid regular expression ({exc})") from None
