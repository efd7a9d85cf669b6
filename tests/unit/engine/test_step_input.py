from __future__ import annotations

import torch

from trt_disagg.engine.step_input import StepInput, build_step_tensors


def test_mixed_prefill_and_decode_rows_see_exactly_their_causal_context() -> None:
    # seq 0: 3-token prompt, nothing cached; seq 1: 1 new token after 4 cached ones.
    step = StepInput(token_ids=[10, 11, 12, 20], query_lens=[3, 1], context_lens=[3, 5], block_tables=[[0], [2, 1]])
    st = build_step_tensors(step, tokens_per_block=4)
    assert st.positions.tolist() == [0, 1, 2, 4]
    assert st.new_slots.tolist() == [0, 1, 2, 4]  # seq 1 position 4 -> block 1, offset 0
    assert st.context_slots[1].tolist() == [8, 9, 10, 11, 4]
    mask = st.key_mask[:, 0]
    assert mask[0, :, :3].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert not mask[0, :, 3:].any()  # padding keys of the shorter context
    assert mask[1, 0].tolist() == [True] * 5
    assert st.last_token_index.tolist() == [2, 3]
    assert st.query_valid.tolist() == [[True, True, True], [True, False, False]]
    assert st.query_rows.tolist() == [0, 1, 2, 3]  # seq 1's token is row 1 * Qmax(3) + 0 of the padded queries
    assert torch.equal(st.token_ids, torch.tensor([10, 11, 12, 20]))
