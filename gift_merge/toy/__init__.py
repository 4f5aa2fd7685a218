"""A toy model family for GIFT's comparison, built locally on a CPU: a word-level tokenizer, a small Llama
base pretrained on synthetic text, an instruct model that is a small change of it, task data in another
answer style, and the sanity measurements that say whether a comparison on it means anything.

Modules: :mod:`~gift_merge.toy.vocabulary` (tokenizer, chat template), :mod:`~gift_merge.toy.problems`
(seeded text generators and the held-out split), :mod:`~gift_merge.toy.scoring` (content apart from
format), :mod:`~gift_merge.toy.corpus` (pretraining text), :mod:`~gift_merge.toy.pretrain`,
:mod:`~gift_merge.toy.instruct`, :mod:`~gift_merge.toy.measure`, :mod:`~gift_merge.toy.gates` and
:mod:`~gift_merge.toy.family` (:func:`build_toy_family`). The evaluation tasks are ``toy_task`` and
``toy_instruct`` in ``gift_merge/evaluate/tasks/``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gift_merge.toy.family import build_toy_family

__all__ = ["build_toy_family"]


def __getattr__(name: str) -> Any:
    # torch and transformers load only when a family is built, not when the tasks import the generators
    if name == "build_toy_family":
        from gift_merge.toy.family import build_toy_family

        return build_toy_family
    raise AttributeError(name)
