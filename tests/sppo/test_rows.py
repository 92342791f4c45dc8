"""sppo/rows.py: selection modes, length fitting, dealing to ranks, collation masks."""

from __future__ import annotations

import pytest
import torch

from sppo.records import Annotated, Generation, Prompt, TrainRow
from sppo.rows import (collate, deal_to_ranks, fit_row, micro_batches, padded_tokens,
                       rows_from_annotated, token_micro_batches)


def _annotated(win_rates, logprobs=None) -> Annotated:
    k = len(win_rates)
    gen = Generation(prompt=Prompt(id="p0", text="q", token_ids=(1, 2, 3)),
                     response_ids=[[10 + i] * (i + 1) for i in range(k)],
                     texts=[f"r{i}" for i in range(k)], finish_reasons=["stop"] * k,
                     logprobs=logprobs)
    return Annotated(generation=gen, logits=[[0.0] * k] * k, probs=[[0.5] * k] * k,
                     win_rates=list(win_rates))


def test_pair_selection_takes_best_and_worst_with_their_own_win_rates():
    rows = rows_from_annotated(_annotated([0.4, 0.7, 0.2, 0.7], logprobs=[-1, -2, -3, -4]),
                               "pair")
    assert len(rows) == 1
    row = rows[0]
    # argmax ties go to the lowest index (index 1, not 3), as np.argmax does
    assert row.chosen_ids == [11, 11] and row.chosen_p == 0.7
    assert row.rejected_ids == [12, 12, 12] and row.rejected_p == 0.2
    assert (row.chosen_ref_logp, row.rejected_ref_logp) == (-2, -3)
    assert row.prompt_ids == [1, 2, 3] and row.prompt_id == "p0"


def test_pair_selection_with_all_ties_pairs_response_zero_with_itself():
    (row,) = rows_from_annotated(_annotated([0.5, 0.5, 0.5]), "pair")
    assert row.chosen_ids == row.rejected_ids == [10]
    assert row.chosen_p == row.rejected_p == 0.5
    assert row.chosen_ref_logp is None


def test_all_selection_gives_one_row_per_response():
    rows = rows_from_annotated(_annotated([0.4, 0.7, 0.2], logprobs=[-1, -2, -3]), "all")
    assert [r.chosen_ids for r in rows] == [[10], [11, 11], [12, 12, 12]]
    assert [r.chosen_p for r in rows] == [0.4, 0.7, 0.2]
    assert [r.chosen_ref_logp for r in rows] == [-1, -2, -3]
    assert not any(r.is_pair for r in rows)


def test_unknown_selection_is_an_error():
    with pytest.raises(ValueError, match="selection"):
        rows_from_annotated(_annotated([0.5, 0.5]), "best")


def _row(prompt=3, chosen=2, rejected=0, p=0.5) -> TrainRow:
    return TrainRow(prompt_id="x", prompt_ids=list(range(1, prompt + 1)),
                    chosen_ids=[7] * chosen, chosen_p=p, rejected_ids=[8] * rejected,
                    rejected_p=1 - p)


def test_fit_row_cuts_responses_or_names_the_drop_reason():
    ok = _row(3, 2, 4)
    assert fit_row(ok, 7, cut_ok=True, pair=True) == (ok, None)
    cut, note = fit_row(_row(3, 6, 2), 7, cut_ok=True, pair=True)
    assert note == "truncated" and len(cut.chosen_ids) == 4 and len(cut.rejected_ids) == 2
    assert fit_row(_row(3, 6, 2), 7, cut_ok=False, pair=True) == \
        (None, "too_long_for_sampled_reference")
    assert fit_row(_row(7, 1, 1), 7, cut_ok=True, pair=True) == (None, "prompt_too_long")
    assert fit_row(_row(0, 1, 1), 7, cut_ok=True, pair=True) == (None, "empty_prompt")
    assert fit_row(_row(3, 0, 0), 7, cut_ok=True, pair=False) == (None, "empty_response")
    assert fit_row(_row(3, 1, 0), 7, cut_ok=True, pair=True) == (None, "not_a_pair")
    assert fit_row(_row(3, 1, 1), 7, cut_ok=True, pair=False) == (None, "unexpected_pair")


def test_deal_to_ranks_gives_equal_length_sorted_lists():
    rows = [_row(1, n) for n in (5, 1, 4, 2, 6, 3)]
    ranks = deal_to_ranks(rows, 2)
    assert [[len(r.chosen_ids) for r in rank] for rank in ranks] == [[1, 3, 5], [2, 4, 6]]
    with pytest.raises(ValueError, match="evenly"):
        deal_to_ranks(rows[:5], 2)
    assert [len(m) for m in micro_batches(ranks[0], 2)] == [2, 1]


def test_token_micro_batches_pack_longest_first_within_the_budget():
    rows = [_row(2, n, n) for n in (1, 9, 3, 2, 7, 4, 1)]  # pairs: 2 sequences of 2 + n
    mbs = token_micro_batches(rows, budget=24)
    assert sorted(r.prompt_id for mb in mbs for r in mb) == sorted(r.prompt_id for r in rows)
    for mb in mbs:
        assert padded_tokens(mb) == len(collate(mb, 0).input_ids.flatten())
        assert padded_tokens(mb) <= 24 or len(mb) == 1
    # Longest first: 2 x 11 tokens alone (with the next: 2 rows x 2 x 11 = 44 > 24), 2 x 9
    # alone, then 2 rows x 2 x 6 = 24, then 3 rows x 2 x 4 = 24.
    assert [[len(r.chosen_ids) for r in mb] for mb in mbs] == [[9], [7], [4, 3], [2, 1, 1]]
    assert [len(mb) for mb in token_micro_batches(rows, budget=10)] == [1] * 7  # all over
    # Asked for more passes (another rank needs them): the largest micro-batches split.
    assert [[len(r.chosen_ids) for r in mb] for mb in token_micro_batches(rows, 24, count=6)] \
        == [[9], [7], [4], [3], [2], [1, 1]]
    assert len(token_micro_batches(rows, 24, count=99)) == 7  # no more rows to split
    assert padded_tokens([]) == 0


def test_collate_pairs_masks_only_response_tokens_and_right_pads():
    rows = [_row(2, 3, 1, p=0.75), _row(3, 1, 2, p=0.25)]
    rows[0].chosen_ref_logp, rows[0].rejected_ref_logp = -1.0, -2.0
    rows[1].chosen_ref_logp, rows[1].rejected_ref_logp = -3.0, -4.0
    batch = collate(rows, pad_id=0)
    # chosen sequences first, then rejected; T = longest = 2 + 3
    assert batch.input_ids.tolist() == [[1, 2, 7, 7, 7], [1, 2, 3, 7, 0],
                                        [1, 2, 8, 0, 0], [1, 2, 3, 8, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0],
                                             [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.response_mask.int().tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 0],
                                                  [0, 0, 1, 0, 0], [0, 0, 0, 1, 1]]
    assert batch.p_chosen.tolist() == [0.75, 0.25] and batch.p_rejected.tolist() == [0.25, 0.75]
    assert batch.ref_chosen.tolist() == [-1, -3] and batch.ref_rejected.tolist() == [-2, -4]
    assert batch.num_rows == 2 and batch.is_pair and batch.num_tokens == 17


def test_collate_singles_and_padding_multiple():
    batch = collate([_row(2, 1), _row(1, 1)], pad_id=9, pad_to_multiple_of=4)
    assert batch.input_ids.tolist() == [[1, 2, 7, 9], [1, 7, 9, 9]]
    assert batch.response_mask.int().tolist() == [[0, 0, 1, 0], [0, 1, 0, 0]]
    assert batch.p_rejected is None and batch.ref_chosen is None and not batch.is_pair
    with pytest.raises(ValueError, match="mixes"):
        collate([_row(2, 1), _row(2, 1, 1)], pad_id=0)


def test_collated_mask_feeds_sequence_logps_for_response_tokens_only():
    """With uniform logits every response token has log-prob -log(V): the sum counts only
    response tokens (3 and 1), not prompt or padding."""
    from sppo.loss import sequence_logps

    batch = collate([_row(2, 3), _row(3, 1)], pad_id=0)
    v = 11
    logits = torch.zeros(*batch.input_ids.shape, v)
    out = sequence_logps(logits, batch.input_ids, batch.response_mask)
    torch.testing.assert_close(out, -torch.tensor([3.0, 1.0]) * torch.log(torch.tensor(v * 1.0)))
