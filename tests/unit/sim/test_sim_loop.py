"""Simulator behaviour against hand-computed timelines, closed-form queueing, and conservation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.unit.sim.sim_helpers import make_instance, make_workload
from trt_disagg.contract import Role
from trt_disagg.sim import ColocatedPolicy, ColocatedSpec, DisaggSpec, SimWorkload, simulate
from trt_disagg.sim.instances import COLOCATED_LANES, ChunkedLane, ColocatedLane, DecodeLane, Recorder
from trt_disagg.workload import make_arrivals


def disagg(p, d, num_prefill=1, num_decode=1, kv_bytes=1000, link=1e9):
    return DisaggSpec(p, d, num_prefill, num_decode, kv_bytes, link)


def test_one_request_timeline_is_prefill_then_transfer_then_decode_steps():
    p = make_instance(prefill=(0.01, 1e-4, 1e-7))
    d = make_instance(decode=(0.02, 1e-5, 1e-3))
    spec = disagg(p, d, kv_bytes=1000, link=1e6)  # 100 tokens x 1000 B / 1 MB/s = 0.1 s transfer
    res = simulate(spec, make_workload([1.0], [100], [4]))
    prefill_s = 0.01 + 1e-4 * 100 + 1e-7 * 100**2
    assert res.ttft_s[0] == pytest.approx(prefill_s)
    steps = [0.02 + 1e-5 * (101 + k) + 1e-3 for k in range(3)]  # context 101, 102, 103
    assert res.finish_s[0] == pytest.approx(1.0 + prefill_s + 0.1 + sum(steps))
    assert res.tpot_s[0] == pytest.approx((0.1 + sum(steps)) / 3)


def test_handoff_latency_and_kv_import_are_added_where_they_happen():
    """handoff_s delays the decode start; importing a prompt's KV stalls the decode lane's next step,
    so a request already decoding there sees it too."""
    p = make_instance(prefill=(0.5, 0.0, 0.0))
    d = make_instance(decode=(0.02, 0.0, 0.0))
    base = DisaggSpec(p, d, 1, 1, 1000, 1e12)
    spec = DisaggSpec(p, d, 1, 1, 1000, 1e12, handoff_s=0.05, import_s_per_token=1e-4)
    work = make_workload([0.0, 0.6], [100, 200], [51, 11])  # the second joins at 1.15 s, the first decodes
    plain, costed = simulate(base, work), simulate(spec, work)
    assert plain.finish_s[0] == pytest.approx(0.5 + 50 * 0.02, rel=1e-6)
    # request 0: + hand-off + its own import (100 tokens) + request 1's import (200 tokens) mid-way
    assert costed.finish_s[0] == pytest.approx(0.5 + 0.05 + 0.01 + 50 * 0.02 + 0.02, rel=1e-6)
    assert costed.first_token_s[0] == pytest.approx(plain.first_token_s[0])  # TTFT is untouched


def test_a_batchs_kv_leaves_one_request_after_another_and_late_arrivals_wait_for_the_next_step():
    """Three prompts prefilled together (0.5-1.0 s, behind a one-token request) send 0.04 s of KV each over
    their instance's one link: it reaches the decode lane at 1.04, 1.08 and 1.12 s. The first starts a 0.05 s
    step at once; the others arrive while a step runs and join the one after it, as on the engine (a step's
    batch is fixed when it starts)."""
    p = make_instance(prefill=(0.5, 0.0, 0.0))
    d = make_instance(decode=(0.05, 0.0, 0.0))
    work = make_workload([0.0, 0.1, 0.1, 0.1], [100] * 4, [1, 3, 3, 3])
    res = simulate(disagg(p, d, kv_bytes=1000, link=2.5e6), work)
    assert res.first_token_s.tolist() == pytest.approx([0.5, 1.0, 1.0, 1.0])
    # steps: 1.04-1.09 (r1), 1.09-1.14 (r1 r2), 1.14-1.19 (r2 r3), 1.19-1.24 (r3)
    assert res.finish_s.tolist() == pytest.approx([0.5, 1.14, 1.19, 1.24])


def test_each_prefill_instance_has_its_own_kv_link():
    from trt_disagg.sim.instances import KVLinks

    links = KVLinks(2, 0.01)
    assert links.send(0, 4, now=0.0) == pytest.approx(0.04)
    assert links.send(0, 4, now=0.0) == pytest.approx(0.08)  # behind the first on the same link
    assert links.send(1, 4, now=0.0) == pytest.approx(0.04)  # the other instance's link is free
    assert links.send(0, 1, now=1.0) == pytest.approx(1.01)  # an idle link starts at once


def test_one_token_answers_finish_at_their_first_token():
    res = simulate(disagg(make_instance(), make_instance()), make_workload([0.0, 0.5], [10, 10], [1, 1]))
    assert np.allclose(res.finish_s, res.first_token_s) and np.all(res.tpot_s == 0)


def test_single_prefill_instance_batch_one_is_an_md1_queue():
    """M/D/1 (Poisson arrivals, deterministic service D): mean wait = rho * D / (2 (1 - rho))."""
    service_s, rho, n = 0.05, 0.7, 40_000
    p = make_instance(prefill=(service_s, 0.0, 0.0), max_batch=1)
    arrivals = make_arrivals("poisson", rho / service_s, n, seed=1)
    res = simulate(disagg(p, make_instance()), make_workload(arrivals, [64] * n, [1] * n), phases=Role.PREFILL)
    mean_wait = float(np.mean(res.ttft_s)) - service_s
    expected = rho * service_s / (2 * (1 - rho))
    assert mean_wait == pytest.approx(expected, rel=0.05)


def test_attainment_falls_monotonically_as_the_rate_grows():
    lengths_in = np.random.default_rng(0).integers(20, 400, 800)
    lengths_out = np.random.default_rng(1).integers(2, 200, 800)
    spec = disagg(make_instance(), make_instance(kv=20_000))
    unit = make_arrivals("poisson", 1.0, 800, seed=3)
    attainment = [simulate(spec, make_workload(unit / rate, lengths_in, lengths_out)).attainment(0.3, 0.05)
                  for rate in (2, 8, 16, 32, 64, 128)]
    assert attainment == sorted(attainment, reverse=True)
    assert attainment[0] > 0.9 > attainment[-1]


@pytest.mark.parametrize("kind", ["disagg", *ColocatedPolicy])
def test_every_request_finishes_exactly_once_with_consistent_times(kind):
    n = 600
    rng = np.random.default_rng(7)
    wl = make_workload(make_arrivals("gamma", 40.0, n, seed=2, cv=3.0), rng.integers(1, 600, n),
                       rng.integers(1, 120, n))
    spec = (disagg(make_instance(), make_instance(kv=30_000), 2, 3) if kind == "disagg"
            else ColocatedSpec(make_instance(kv=30_000), 2, kind))
    res = simulate(spec, wl)
    assert res.num_completed == n
    assert np.all(res.first_token_s >= wl.arrival_s)
    assert np.all(res.finish_s >= res.first_token_s)
    assert np.all(res.tpot_s[wl.output_len > 1] > 0)


def test_colocated_prefill_stalls_running_decodes_but_disaggregation_does_not():
    # A long decode is running when a long prompt arrives: colocated, its prefill runs between decode steps.
    wl = make_workload([0.0, 0.05], [10, 2000], [50, 2])
    slow_prefill = make_instance(prefill=(0.01, 2e-4, 0.0), decode=(0.01, 0.0, 0.0))
    colocated = simulate(ColocatedSpec(slow_prefill, 1), wl)
    separate = simulate(disagg(slow_prefill, slow_prefill, link=1e15), wl)
    assert colocated.tpot_s[0] > separate.tpot_s[0] + 0.005  # the 0.41 s prefill lands inside one decode gap
    assert separate.tpot_s[0] == pytest.approx(0.01, rel=0.01)


def test_chunked_prefill_spreads_a_long_prompt_over_iterations():
    wl = make_workload([0.0], [1000], [2])
    spec = ColocatedSpec(make_instance(prefill=(0.01, 1e-4, 0.0), max_tokens=256), 1, "chunked")
    res = simulate(spec, wl)
    # 4 iterations (256+256+256+232 tokens), each paying the fixed cost once
    assert res.ttft_s[0] == pytest.approx(4 * 0.01 + 1e-4 * 1000)


def test_pipeline_parallel_prefill_overlaps_batches():
    p = make_instance(prefill=(0.1, 0.0, 0.0), pp=2, max_batch=1)
    res = simulate(disagg(p, make_instance()), make_workload([0.0, 0.0], [10, 10], [1, 1]), phases=Role.PREFILL)
    # stage time 0.05: the second batch enters after 0.05 s and has the full 0.1 s (+ one hop) latency
    assert sorted(res.ttft_s) == pytest.approx([0.1, 0.15], abs=1e-4)


def test_pipeline_parallel_decode_has_bubbles_with_fewer_sequences_than_stages():
    # PP4 decode: one sequence fills one micro-batch lane; each of its steps crosses all stages (full time).
    d_tp = make_instance(decode=(0.01, 0.0, 0.0), link=1e15)
    d_pp = make_instance(decode=(0.01, 0.0, 0.0), pp=4, link=1e15)
    one = make_workload([0.0], [10], [11])
    tp_finish = simulate(disagg(make_instance(), d_tp, link=1e15), one, phases=Role.DECODE).finish_s[0]
    pp_finish = simulate(disagg(make_instance(), d_pp, link=1e15), one, phases=Role.DECODE).finish_s[0]
    assert pp_finish >= tp_finish == pytest.approx(10 * 0.01)  # no speed-up: the other 3 stages idle
    # Four sequences fill four micro-batches: they run side by side, each at the one-sequence pace.
    four = make_workload([0.0] * 4, [10] * 4, [11] * 4)
    res = simulate(disagg(make_instance(), d_pp, link=1e15), four, phases=Role.DECODE)
    assert np.allclose(res.finish_s, pp_finish)


def test_decode_kv_capacity_limits_the_batch():
    # Capacity fits one request (in+out = 60) at a time: the second waits for the first to finish.
    d = make_instance(decode=(0.01, 0.0, 0.0), kv=100)
    res = simulate(disagg(make_instance(), d, link=1e15), make_workload([0.0, 0.0], [10, 10], [50, 50]),
                   phases=Role.DECODE)
    first, second = sorted(res.finish_s)
    assert first == pytest.approx(49 * 0.01)
    assert second == pytest.approx(2 * 49 * 0.01)


def test_workload_arrays_must_agree():
    with pytest.raises(ValueError):
        SimWorkload.from_lengths([0.0, 1.0], [1], [1, 1])


@pytest.mark.parametrize("lane_cls", [DecodeLane, ColocatedLane, ChunkedLane])
def test_lanes_hold_no_kv_after_everything_finished(lane_cls):
    rng = np.random.default_rng(5)
    n = 200
    inputs, outputs = rng.integers(1, 300, n).tolist(), rng.integers(1, 40, n).tolist()
    rec = Recorder(n)
    lane = lane_cls(make_instance(kv=2_000, max_tokens=128), inputs, outputs, rec)
    for i in range(n):
        now = i * 0.01
        lane.advance(now)
        if lane_cls is DecodeLane:  # as the loop does: the first token exists, one-token answers are done
            rec.first_token(i, now)
            if outputs[i] == 1:
                rec.finish(i, now)
                continue
        lane.add(i, now)
    lane.advance(math.inf)
    assert rec.num_completed == n
    assert lane.load == 0


def test_every_colocated_policy_has_a_lane_and_specs_take_names():
    assert set(COLOCATED_LANES) == set(ColocatedPolicy)
    assert ColocatedSpec(make_instance(), 1, "chunked").policy is ColocatedPolicy.CHUNKED  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ColocatedSpec(make_instance(), 1, "round-robin")  # type: ignore[arg-type]


def test_decode_steps_that_start_beside_a_prefill_take_the_factor_of_their_batch_size():
    """Request 0 decodes (batch 1) from 0.5 s; request 1 prefills from 0.6 to 1.1 s on the other instance:
    the 13 steps of request 0 that start inside [0.6, 1.1) take 2x; later steps (batch 2, no prefill) do not."""
    p = make_instance(prefill=(0.5, 0.0, 0.0))
    d = make_instance(decode=(0.02, 0.0, 0.0))
    work = make_workload([0.0, 0.6], [100, 200], [51, 11])
    plain = simulate(DisaggSpec(p, d, 1, 1, 1000, 1e12), work)
    beside = simulate(DisaggSpec(p, d, 1, 1, 1000, 1e12, decode_beside_prefill=(2.0,)), work)
    assert plain.finish_s[0] == pytest.approx(0.5 + 50 * 0.02, rel=1e-6)
    assert beside.finish_s[0] == pytest.approx(0.5 + 5 * 0.02 + 13 * 0.04 + 32 * 0.02, rel=1e-6)
    assert beside.first_token_s.tolist() == pytest.approx(plain.first_token_s.tolist())  # prefill untouched
    batch_two_only = simulate(DisaggSpec(p, d, 1, 1, 1000, 1e12, decode_beside_prefill=(1.0, 3.0)), work)
    assert batch_two_only.finish_s[0] == pytest.approx(plain.finish_s[0], rel=1e-6)


def test_prefill_activity_sees_any_batch_running_across_instances():
    from trt_disagg.sim.instances import PrefillActivity

    activity = PrefillActivity((1.5, 2.0))
    activity.started(0.0, 3.0)  # instance A, a long batch
    activity.started(1.0, 1.5)  # instance B, a short one inside it
    assert activity.slowdown(2.0, 1) == 1.5  # B is done, A still runs
    assert activity.slowdown(2.0, 7) == 2.0  # the last factor serves larger batches
    assert activity.slowdown(3.0, 1) == 1.0 and activity.slowdown(-1.0, 1) == 1.0
