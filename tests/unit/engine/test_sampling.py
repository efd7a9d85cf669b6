from __future__ import annotations

import torch

from trt_disagg.contract import SamplingParams
from trt_disagg.engine.sampling import make_generator, sample_token


def test_greedy_is_argmax_and_needs_no_rng() -> None:
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    params = SamplingParams()
    assert make_generator(params) is None
    assert sample_token(logits, params, None) == 1
    assert SamplingParams(temperature=1.0, top_k=1).greedy


def test_same_seed_same_tokens_and_filters_restrict_the_choice() -> None:
    logits = torch.randn(100)
    params = SamplingParams(temperature=1.0, seed=7)
    a = [sample_token(logits, params, g) for g in [make_generator(params)] for _ in range(20)]
    b = [sample_token(logits, params, g) for g in [make_generator(params)] for _ in range(20)]
    assert a == b
    top3 = set(torch.topk(logits, 3).indices.tolist())
    k3 = SamplingParams(temperature=1.0, top_k=3, seed=1)
    gen = make_generator(k3)
    assert {sample_token(logits, k3, gen) for _ in range(50)} <= top3
    tiny_p = SamplingParams(temperature=1.0, top_p=1e-6, seed=1)
    gen = make_generator(tiny_p)
    assert {sample_token(logits, tiny_p, gen) for _ in range(10)} == {int(torch.argmax(logits))}
