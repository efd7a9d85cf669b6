"""ignore_eos / min_tokens (vLLM's names): how benchmarks ask for fixed output lengths."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from router.schemas import ChatRequest, CompletionRequest
from trt_disagg.contract import IGNORE_EOS_END_ID


def test_ignore_eos_sends_tensorrt_llms_never_matching_end_id() -> None:
    req = CompletionRequest(model="m", prompt="hi", max_tokens=8, ignore_eos=True)
    sampling = req.sampling(8, end_id=2)
    assert sampling.end_id == IGNORE_EOS_END_ID and sampling.ignore_eos


def test_min_tokens_equal_to_max_tokens_means_a_fixed_length() -> None:
    req = CompletionRequest(model="m", prompt="hi", max_tokens=8, min_tokens=8)
    assert req.sampling(8, end_id=2).end_id == IGNORE_EOS_END_ID
    chat = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=4,
                       min_tokens=4)
    assert chat.sampling(4, end_id=2).ignore_eos


def test_plain_request_keeps_the_models_end_id_and_partial_min_tokens_is_refused() -> None:
    assert CompletionRequest(model="m", prompt="hi", max_tokens=8).sampling(8, end_id=2).end_id == 2
    with pytest.raises(ValidationError, match="min_tokens"):
        CompletionRequest(model="m", prompt="hi", max_tokens=8, min_tokens=3)
