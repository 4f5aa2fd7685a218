"""Per-token loss weights and their alignment with the logits: the heart of GIFT.

For a sequence of ids ``x_0 … x_{T-1}`` whose first ``P`` tokens are the prompt, logit position ``p``
predicts ``x_{p+1}``. The targets are therefore the positions ``p = P−1 … T−2``, and each one carries

    w_p = min(max(q, floor), 1) ** γ     if the response token x_{p+1} has a score q (the j-th, p = P−1+j)
    w_p = 1                              if it has none: the appended EOS, as in the authors' code
    w_p = 0                              for prompt positions, the last position and padding

which is the authors' ``loss_weights[source_len − 1 + j] = max(q_j, 1e-4)`` consumed as
``loss_weights[..., :-1]`` next to ``logits[..., :-1]``, with their ``clamp(w, 1e-8, 1) ** focal_gamma``.
In ``sft`` mode every target weighs 1 through the same code, so γ = 0 or all-ones scores give the sft
loss bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
"""Label of positions that predict nothing (prompt, last position, padding)."""


@dataclass(frozen=True)
class TokenSequence:
    """One training sequence with its targets and weights, all aligned to logit positions.

    ``labels[p]`` is the token position ``p`` predicts (``input_ids[p + 1]``) or :data:`IGNORE_INDEX`;
    ``weights[p]`` is that prediction's weight, 0 wherever ``labels`` is ignored.
    """

    input_ids: torch.Tensor  # (T,) int64
    labels: torch.Tensor  # (T,) int64
    weights: torch.Tensor  # (T,) float32

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class ScoreMismatch(ValueError):
    """The scores do not fit the tokenised response (another tokenizer, template or max length)."""


def build_sequence(
    ids: Sequence[int],
    prompt_len: int,
    scores: Sequence[float] | None,
    *,
    gamma: float = 1.0,
    floor: float = 1e-4,
    truncated: bool = False,
) -> TokenSequence:
    """Targets and GIFT weights of ``ids`` (prompt + response + EOS) whose first ``prompt_len`` are prompt.

    ``scores`` (None: sft, every target weighs 1) are the instruct probabilities of the response tokens
    in order, as annotation writes them: one per response token, none for the EOS. More scores than
    targets are accepted only when ``truncated`` (the annotation kept a longer response).

    >>> s = build_sequence([7, 8, 9, 10, 2], prompt_len=2, scores=[0.5, 0.25])
    >>> s.labels.tolist(), s.weights.tolist()
    ([-100, 9, 10, 2, -100], [0.0, 0.5, 0.25, 1.0, 0.0])
    """
    length = len(ids)
    input_ids = torch.tensor(list(ids), dtype=torch.long)
    labels = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
    weights = torch.zeros(length, dtype=torch.float32)
    first = max(prompt_len, 1) - 1  # the logit position that predicts the first response token
    num_targets = max(length - 1 - first, 0)
    if num_targets == 0:
        return TokenSequence(input_ids, labels, weights)
    labels[first : length - 1] = input_ids[first + 1 :]
    weights[first : length - 1] = 1.0
    if scores is not None:
        if len(scores) < num_targets - 1:
            raise ScoreMismatch(f"{len(scores)} scores for {num_targets - 1} response tokens")
        if len(scores) > num_targets and not truncated:
            raise ScoreMismatch(f"{len(scores)} scores for {num_targets - 1} response tokens")
        used = torch.tensor(list(scores[:num_targets]), dtype=torch.float64).clamp(min=floor)
        weights[first : first + len(used)] = used.to(torch.float32)
        # The authors' loss: clamp(w, 1e-8, 1.0) ** focal_gamma, in float32; the EOS stays 1 ** γ = 1.
        weights[first : length - 1] = weights[first : length - 1].clamp(1e-8, 1.0) ** gamma
    return TokenSequence(input_ids, labels, weights)


@dataclass(frozen=True)
class Batch:
    """A right-padded micro-batch; right padding keeps every token at its unpadded position."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE_INDEX off target
    weights: torch.Tensor  # (B, T) float32, 0 off target

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            *(t.to(device, non_blocking=True) for t in (self.input_ids, self.attention_mask, self.labels, self.weights))
        )


def collate(sequences: Sequence[TokenSequence], pad_id: int) -> Batch:
    """Pad ``sequences`` on the right to the longest; padding predicts nothing and weighs 0."""
    width = max(len(s.input_ids) for s in sequences)
    batch = len(sequences)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    weights = torch.zeros((batch, width), dtype=torch.float32)
    for row, seq in enumerate(sequences):
        n = len(seq.input_ids)
        input_ids[row, :n] = seq.input_ids
        attention_mask[row, :n] = 1
        labels[row, :n] = seq.labels
        weights[row, :n] = seq.weights
    return Batch(input_ids, attention_mask, labels, weights)
