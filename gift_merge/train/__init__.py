"""The GIFT trainer: confidence annotation and guided LoRA training on the base model.

GIFT (Ruan et al., ACL 2026, arXiv 2605.01256; code ``sustech-nlp/gift``) scores every response token
with the instruct model, q_t = p_instruct(y_t | x, y_<t), trains a LoRA adapter on the *base* model
with the loss Σ w_t ℓ_t / Σ w_t, w_t = max(q_t, 1e-4)^γ, and merges the adapter into the instruct model.

>>> from gift_merge.train import AnnotateConfig, TrainConfig, annotate, train
>>> annotate(AnnotateConfig(instruct="m/instruct", data="d.jsonl", out="a.jsonl"))  # doctest: +SKIP
>>> train(TrainConfig(base="m/base", data="a.jsonl", out="adapter", instruct="m/instruct"))  # doctest: +SKIP

Heavy modules (torch, transformers, peft) load on first use, so the CLI starts fast.
"""

from __future__ import annotations

from gift_merge.lazy import lazy_getattr
from gift_merge.train.config import AnnotateConfig, TrainConfig

__all__ = ["AnnotateConfig", "TrainConfig", "annotate", "train"]

_HOMES = {"annotate": "gift_merge.train.annotation", "train": "gift_merge.train.loop"}


__getattr__ = lazy_getattr(__name__, _HOMES)
