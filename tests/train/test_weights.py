"""Weight alignment: each logit position carries the weight of the token it predicts."""

from __future__ import annotations

import pytest
import torch

from gift_merge.train.weights import IGNORE_INDEX, ScoreMismatch, build_sequence, collate


def test_five_token_example_by_hand() -> None:
    # ids: prompt [10, 11], response [12, 13], EOS 2. Logit p predicts ids[p + 1]:
    #   p=0 predicts 11 (prompt)      → ignored, weight 0
    #   p=1 predicts 12 (response[0]) → q=0.5
    #   p=2 predicts 13 (response[1]) → q=0.00002 floored to 1e-4
    #   p=3 predicts 2  (EOS)         → no score, weight 1
    #   p=4 predicts nothing          → ignored, weight 0
    seq = build_sequence([10, 11, 12, 13, 2], prompt_len=2, scores=[0.5, 0.00002])
    assert seq.labels.tolist() == [IGNORE_INDEX, 12, 13, 2, IGNORE_INDEX]
    assert seq.weights.tolist() == pytest.approx([0.0, 0.5, 1e-4, 1.0, 0.0], rel=1e-6)
    assert seq.num_targets == 3

    squared = build_sequence([10, 11, 12, 13, 2], prompt_len=2, scores=[0.5, 0.00002], gamma=2.0)
    assert squared.weights.tolist() == pytest.approx([0.0, 0.25, 1e-8, 1.0, 0.0], rel=1e-5)

    flat = build_sequence([10, 11, 12, 13, 2], prompt_len=2, scores=[0.5, 0.00002], gamma=0.0)
    sft = build_sequence([10, 11, 12, 13, 2], prompt_len=2, scores=None)
    assert torch.equal(flat.weights, sft.weights)
    assert sft.weights.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def _authors_weights(ids: list[int], source_len: int, scores: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' SupervisedDataset + compute_loss alignment, transcribed: (shift_labels, shift_weights)."""
    labels = torch.tensor(ids)
    labels[:source_len] = IGNORE_INDEX
    weights = torch.zeros(len(ids))
    weights[labels != IGNORE_INDEX] = 1.0
    for j, prob in enumerate(scores):
        pos = source_len - 1 + j
        if pos >= len(ids):
            break
        weights[pos] = max(prob, 1e-4)
    return labels[1:], weights[:-1].clamp(1e-8, 1.0)


@pytest.mark.parametrize("n_scores", [6, 7])  # the authors accept resp_len - 1 and resp_len scores
def test_matches_the_authors_alignment(n_scores: int) -> None:
    ids = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 2]
    scores = [0.9, 0.1, 0.00001, 0.7, 0.3, 0.5, 0.25][:n_scores]
    theirs_labels, theirs_weights = _authors_weights(ids, 4, scores)
    ours = build_sequence(ids, 4, scores)
    valid = theirs_labels != IGNORE_INDEX
    assert torch.equal(ours.labels[:-1], theirs_labels)
    assert torch.equal(ours.weights[:-1][valid], theirs_weights[valid])
    assert torch.equal(ours.weights[:-1][~valid], torch.zeros(int((~valid).sum())))


def test_score_count_must_fit_the_response() -> None:
    with pytest.raises(ScoreMismatch):
        build_sequence([1, 2, 3, 4, 2], 2, scores=[0.5])  # 2 response tokens, 1 score
    with pytest.raises(ScoreMismatch):
        build_sequence([1, 2, 3, 4, 2], 2, scores=[0.5, 0.5, 0.5, 0.5])
    # Truncated in training (no EOS): extra scores from a longer annotation are fine.
    cut = build_sequence([1, 2, 3, 4, 5], 2, scores=[0.5, 0.4, 0.3, 0.2], truncated=True)
    assert cut.weights.tolist() == pytest.approx([0.0, 0.5, 0.4, 0.3, 0.0])


def test_prompt_filling_everything_has_no_targets() -> None:
    seq = build_sequence([1, 2, 3], prompt_len=3, scores=[])
    assert seq.num_targets == 0 and seq.weights.sum() == 0


def test_collate_pads_right_with_zero_weight() -> None:
    a = build_sequence([1, 2, 3, 2], 2, [0.5])
    b = build_sequence([1, 2, 3, 4, 5, 2], 2, [0.5, 0.5, 0.5])
    batch = collate([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 2, 0, 0], [1, 2, 3, 4, 5, 2]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert batch.labels[0].tolist() == [IGNORE_INDEX, 3, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert batch.weights[0].tolist() == [0.0, 0.5, 1.0, 0.0, 0.0, 0.0]
    assert batch.num_tokens == 10
