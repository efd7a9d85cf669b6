from __future__ import annotations

import torch

from trt_disagg.contract import SamplingParams, sampling_problem
from trt_disagg.engine.sampling import make_generator, sample_batch, sample_token


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


def _solo(logits: torch.Tensor, params: SamplingParams) -> list[int]:
    gen = make_generator(params)
    return [sample_token(logits, params, gen) for _ in range(5)]


def test_a_batch_samples_each_row_as_it_would_alone() -> None:
    """Seeded rows give the same tokens batched with others as alone, whatever their filters: the batch
    is a few tensor operations, not a loop, but the draw per row comes from the row's own generator."""
    torch.manual_seed(0)
    logits = torch.randn(6, 1000) * 2
    logits[3] = 0.0  # flat: its top-p nucleus is wider than the candidates, so that row is sorted in full
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0.7, top_p=0.9, seed=2),
              SamplingParams(temperature=1.3, top_k=5, seed=3), SamplingParams(temperature=1.0, top_p=0.95, seed=4),
              SamplingParams(), SamplingParams(temperature=1.0, top_k=40, top_p=0.5, seed=5)]
    gens = [make_generator(p) for p in params]
    batched: list[list[int]] = [[] for _ in params]
    for _ in range(5):
        out = sample_batch(logits, params, gens)
        assert out.errors == {}
        for row, token in enumerate(out.tokens):
            assert token is not None
            batched[row].append(token)
    assert batched == [_solo(logits[i], p) for i, p in enumerate(params)]
    assert set(batched[2]) <= set(torch.topk(logits[2], 5).indices.tolist())
    assert batched[4] == [int(torch.argmax(logits[4]))] * 5


def test_a_temperature_below_epsilon_is_greedy_and_cannot_overflow() -> None:
    logits = torch.randn(50) * 30
    params = SamplingParams(temperature=1e-40, seed=1)
    assert params.greedy and make_generator(params) is None
    assert sample_token(logits, params, None) == int(torch.argmax(logits))


def test_a_bad_row_fails_alone() -> None:
    """NaN sampling values or NaN logits in one row fail that row; every other row gets its token."""
    logits = torch.randn(4, 100)
    logits[2, 7] = float("nan")
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=float("nan"), seed=2),
              SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=1.0, top_p=float("nan"), seed=4)]
    out = sample_batch(logits, params, [make_generator(p) for p in params])
    assert set(out.errors) == {1, 2, 3}
    assert out.tokens[1] is None and out.tokens[2] is None and out.tokens[3] is None
    assert out.tokens[0] == _solo(logits[0], params[0])[0]
    assert "temperature" in out.errors[1] and "top_p" in out.errors[3]


def test_every_sampling_boundary_refuses_non_finite_values() -> None:
    for bad in (float("nan"), float("inf"), -1.0):
        assert sampling_problem(bad, 1.0, 0) is not None
    assert sampling_problem(1.0, float("nan"), 0) is not None
    assert sampling_problem(1.0, 0.0, 0) is not None
    assert sampling_problem(1.0, 1.0, -1) is not None
    assert sampling_problem(1e-40, 1.0, 0) is None


def test_a_wide_nucleus_is_the_sorted_one() -> None:
    """A flat row's nucleus (wider than the top-k candidates) is found by bisection, not a sort: the same
    tokens as sorting and cutting at top_p."""
    torch.manual_seed(3)
    probs = torch.softmax(torch.randn(2, 5000) * 0.3, dim=-1)
    top_p = torch.tensor([[0.9], [0.5]])
    from trt_disagg.engine import sampling

    for row in range(2):
        ordered, index = torch.sort(probs[row], descending=True)
        keep = (torch.cumsum(ordered, 0) - ordered) < top_p[row]
        expected = set(index[keep].tolist())
        assert len(expected) > sampling.NUCLEUS_CANDIDATES
        draws = {sampling._wide_nucleus(probs[row:row + 1], top_p[row:row + 1], torch.rand(1))[0] for _ in range(300)}
        assert draws <= expected


def test_logits_on_the_engines_device_sample_as_on_the_cpu(device) -> None:
    """A CUDA engine's logits stay on the GPU: greedy and seeded rows give the CPU's tokens (the draws come
    from each request's host generator whatever the device)."""
    torch.manual_seed(1)
    logits = torch.randn(4, 500) * 3
    params = [SamplingParams(), SamplingParams(temperature=0.9, top_k=20, seed=3),
              SamplingParams(temperature=1.0, top_p=0.8, seed=4), SamplingParams(temperature=0.5, seed=5)]
    on_cpu = sample_batch(logits, params, [make_generator(p) for p in params])
    on_device = sample_batch(logits.to(device), params, [make_generator(p) for p in params])
    assert on_device.errors == {} and on_device.tokens == on_cpu.tokens
