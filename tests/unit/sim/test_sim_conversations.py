"""Conversations in the simulator: a later turn's TTFT drops with reuse, kv-aware routing returns a
conversation to the instance holding its prefix, least-loaded takes turns between idle instances, closed-loop turns follow their answer, and without reuse the
conversation loop reproduces the plain loop."""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.sim.sim_helpers import make_instance
from trt_disagg.sim import (
    ColocatedSpec,
    ConversationLinks,
    DisaggSpec,
    PrefixReuse,
    SimWorkload,
    conversation_loop,
    simulate,
)

QUADRATIC = (0.01, 1e-4, 1e-7)  # prefill a + b*l + c*l^2: the suffix costs less in both terms


def _conv(arrivals, inputs, outputs, previous, shared, think=None, closed=False) -> SimWorkload:
    n = len(inputs)
    links = ConversationLinks(np.array(previous), np.array(shared), np.array(think or [0.0] * n, float), closed)
    return SimWorkload(np.asarray(arrivals, float), np.array(inputs), np.array(outputs), links)


def test_the_second_turn_prefills_only_its_suffix():
    spec = ColocatedSpec(make_instance(prefill=QUADRATIC), 1)
    wl = _conv([0.0, 10.0], [1000, 1300], [50, 20], [-1, 0], [0, 1050])
    off = simulate(spec, wl, reuse=PrefixReuse(enabled=False))
    on = simulate(spec, wl, reuse=PrefixReuse(tokens_per_block=16))
    assert on.ttft_s[0] == pytest.approx(off.ttft_s[0])
    matched = 1049 // 16 * 16  # the previous turn's KV: prompt + answer but its last token, whole blocks
    assert on.matched_tokens.tolist() == [0, matched]
    assert on.prefill_tokens.tolist() == [1000, 1300 - matched]
    x, m = 1300 - matched, matched
    expected = 0.01 + 1e-4 * x + 1e-7 * x * (x + 2 * m)
    assert on.ttft_s[1] == pytest.approx(expected)
    assert on.ttft_s[1] < off.ttft_s[1] / 2


def _two_conversations() -> SimWorkload:
    # A's turn 1 runs on instance 0; B's turn 1 arrives while A runs, so goes to instance 1; both are idle when
    # B's turn 2 arrives: least-loaded takes the first instance, kv-aware the one holding B's prefix.
    return _conv([0.0, 0.001, 20.0], [500, 500, 700], [100, 100, 10], [-1, -1, 1], [0, 0, 600])


@pytest.mark.parametrize("spec", [ColocatedSpec(make_instance(prefill=QUADRATIC), 2),
                                  ColocatedSpec(make_instance(prefill=QUADRATIC), 2, "chunked")])
def test_kv_aware_routing_returns_a_conversation_to_the_instance_holding_its_prefix(spec):
    least = simulate(spec, _two_conversations(), reuse=PrefixReuse(routing="least_loaded"))
    aware = simulate(spec, _two_conversations(), reuse=PrefixReuse(routing="kv_aware"))
    assert least.matched_tokens[2] == 0
    assert aware.matched_tokens[2] == 599 // 16 * 16
    assert aware.ttft_s[2] < least.ttft_s[2]


def test_least_loaded_alternates_idle_instances_as_the_router_does():
    # one conversation, each turn sent when both instances are idle: the router's least-loaded sees a tie every
    # time and takes turns, so turn 1 lands on the other instance (no hit) and turn 2 back on the first, where
    # only turn 0's prompt + answer is cached; kv-aware keeps the conversation on one instance.
    spec = ColocatedSpec(make_instance(prefill=QUADRATIC), 2)
    wl = _conv([0.0, 20.0, 40.0], [300, 400, 500], [20, 20, 20], [-1, 0, 1], [0, 320, 420])
    least = simulate(spec, wl, reuse=PrefixReuse(routing="least_loaded"))
    aware = simulate(spec, wl, reuse=PrefixReuse(routing="kv_aware"))
    assert least.matched_tokens.tolist() == [0, 0, 319 // 16 * 16]
    assert aware.matched_tokens.tolist() == [0, 319 // 16 * 16, 419 // 16 * 16]


def test_closed_loop_turns_arrive_think_time_after_their_answer():
    spec = ColocatedSpec(make_instance(prefill=QUADRATIC), 2)
    wl = _conv([0.0, 0.0, 0.5], [200, 300, 100], [10, 5, 8], [-1, 0, -1], [0, 210, 0], [0.0, 2.0, 0.0], closed=True)
    res = simulate(spec, wl, reuse=PrefixReuse())
    assert res.arrival_s[1] == pytest.approx(res.finish_s[0] + 2.0)
    assert res.matched_tokens[1] == 209 // 16 * 16


@pytest.mark.parametrize("make_spec", [
    lambda: ColocatedSpec(make_instance(kv=3000), 2),
    lambda: ColocatedSpec(make_instance(kv=3000, pp=2), 2, "chunked"),
    lambda: DisaggSpec(make_instance(), make_instance(kv=3000, pp=2), 1, 2, 1000, 1e9, import_s_per_token=1e-6),
])
def test_without_reuse_the_conversation_loop_reproduces_the_plain_loop(make_spec):
    rng = np.random.default_rng(3)
    n = 300
    arrivals = np.cumsum(rng.exponential(0.02, n))
    inputs, outputs = rng.integers(10, 900, n), rng.integers(1, 60, n)
    plain = simulate(make_spec(), SimWorkload.from_lengths(arrivals, inputs, outputs))
    wl = _conv(arrivals, inputs, outputs, [-1] * n, [0] * n)
    run = conversation_loop.run_colocated if isinstance(make_spec(), ColocatedSpec) else conversation_loop.run_disagg
    conv = run(make_spec(), wl, None)  # type: ignore[arg-type]
    np.testing.assert_array_equal(conv.first_token_s, plain.first_token_s)
    np.testing.assert_array_equal(conv.finish_s, plain.finish_s)
    disabled = simulate(make_spec(), SimWorkload.from_lengths(arrivals, inputs, outputs),
                        reuse=PrefixReuse(enabled=False))
    np.testing.assert_array_equal(disabled.finish_s, plain.finish_s)


def test_conditional_disaggregation_prefills_a_short_suffix_on_the_decode_instance():
    spec = DisaggSpec(make_instance(prefill=QUADRATIC), make_instance(prefill=QUADRATIC), 1, 2, 1000, 1e9)
    wl = _conv([0.0, 10.0], [1000, 1040], [50, 20], [-1, 0], [0, 1050])
    reuse = PrefixReuse(routing="kv_aware", local_prefill_max_tokens=64)
    res = simulate(spec, wl, reuse=reuse)
    assert res.matched_tokens[1] == 1039 // 16 * 16  # the decode instance kept prompt + answer
    far = simulate(spec, wl, reuse=PrefixReuse(routing="kv_aware"))
    assert far.matched_tokens[1] == 1000 // 16 * 16  # the prefill instance only ever saw the prompt
    assert res.ttft_s[1] < far.ttft_s[1]


def test_a_flood_of_unique_prompts_never_over_commits_the_pool():
    spec = ColocatedSpec(make_instance(kv=4000), 1)
    n = 200
    wl = _conv(np.arange(n) * 0.01, [300] * n, [20] * n, [-1] * n, [0] * n)
    res = simulate(spec, wl, reuse=PrefixReuse())
    assert res.num_completed == n and int(res.matched_tokens.sum()) == 0
