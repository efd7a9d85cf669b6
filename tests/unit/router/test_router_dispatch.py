"""Dispatch policies, drain marks, conditional disaggregation, and load shared between routers."""

from __future__ import annotations

import time

import pytest

from router.dispatch import (
    Candidate,
    Dispatcher,
    LeastLoaded,
    Outstanding,
    RoundRobin,
    ServePath,
    make_policy,
)
from tests.unit.router.router_testkit import register
from trt_disagg.contract import InstanceInfo, InstanceLoad, Role
from trt_disagg.keys import drain_key


def cand(i: str, role: Role = Role.PREFILL, *, queued: int = 0, running: int = 0, free: int = 10,
         outstanding: Outstanding | None = None) -> Candidate:
    info = InstanceInfo(i, role, "h", "g", "h", "k", 1, 1, 100, "f", role.value)
    return Candidate(info, InstanceLoad(queued_prompt_tokens=queued, running_sequences=running,
                                        free_kv_blocks=free, total_kv_blocks=10), outstanding or Outstanding())


def test_least_loaded_prefill_takes_the_shortest_queue_counting_outstanding_tokens():
    p = LeastLoaded()
    assert p.choose(Role.PREFILL, [cand("a", queued=50), cand("b", queued=10)]).info.instance_id == "b"
    # an instance's report lags; the routers' outstanding tokens count when larger
    busy = cand("b", queued=10, outstanding=Outstanding(prompt_tokens=90))
    assert p.choose(Role.PREFILL, [cand("a", queued=50), busy]).info.instance_id == "a"
    assert p.choose(Role.PREFILL, []) is None


def test_least_loaded_decode_takes_fewest_sequences_then_most_free_kv():
    p = LeastLoaded()
    cs = [cand("a", Role.DECODE, running=3), cand("b", Role.DECODE, running=1, free=2),
          cand("c", Role.DECODE, running=1, free=9)]
    assert p.choose(Role.DECODE, cs).info.instance_id == "c"


def test_least_loaded_instances_that_tie_take_turns():
    # requests that never overlap see every instance idle: ties by id would put all of them on one
    p = LeastLoaded()
    idle = [cand("d1", Role.DECODE), cand("d0", Role.DECODE), cand("d2", Role.DECODE, running=1)]
    assert [p.choose(Role.DECODE, idle).info.instance_id for _ in range(4)] == ["d0", "d1", "d0", "d1"]
    # free KV decides only by tenths of the pool: 95 vs 99 free of 100 is a tie, 85 vs 99 is not
    near = [cand("d0", Role.DECODE), cand("d1", Role.DECODE)]
    near = [Candidate(c.info, InstanceLoad(free_kv_blocks=f, total_kv_blocks=100), c.outstanding)
            for c, f in zip(near, (95, 99), strict=True)]
    assert {p.choose(Role.DECODE, near).info.instance_id for _ in range(2)} == {"d0", "d1"}
    far = [Candidate(near[0].info, InstanceLoad(free_kv_blocks=85, total_kv_blocks=100), Outstanding()), near[1]]
    assert {p.choose(Role.DECODE, far).info.instance_id for _ in range(2)} == {"d1"}
    prefills = [cand("p0"), cand("p1")]
    assert {p.choose(Role.PREFILL, prefills).info.instance_id for _ in range(2)} == {"p0", "p1"}


def test_round_robin_cycles_by_id():
    p = RoundRobin()
    cs = [cand("b"), cand("a"), cand("c")]
    assert [p.choose(Role.PREFILL, cs).info.instance_id for _ in range(4)] == ["a", "b", "c", "a"]


def test_policy_registry():
    assert isinstance(make_policy("round_robin"), RoundRobin)
    with pytest.raises(ValueError, match="least_loaded"):
        make_policy("random")


def make_dispatcher(redis, router_id: str = "r1", threshold: int = 0, max_queued: int = 1000) -> Dispatcher:
    return Dispatcher(redis, router_id, LeastLoaded(), colocated_threshold_tokens=threshold,
                      max_queued_prompt_tokens=max_queued, publish_ttl_s=5.0)


async def test_refresh_reads_registry_and_drain_marks(redis):
    await register(redis, "p0", Role.PREFILL)
    await register(redis, "p1", Role.PREFILL)
    await register(redis, "d0", Role.DECODE)
    d = make_dispatcher(redis)
    await d.refresh()
    assert d.can_serve() and d.choose_path(10) is ServePath.DISAGGREGATED
    await redis.set(drain_key("p0"), "1")
    await d.refresh()
    assert [d.pick(Role.PREFILL).instance_id for _ in range(3)] == ["p1"] * 3
    await redis.set(drain_key("p1"), "1")
    await d.refresh()
    assert not d.can_serve() and d.pick(Role.PREFILL) is None and d.choose_path(10) is None


async def test_conditional_disaggregation(redis):
    await register(redis, "p0", Role.PREFILL)
    await register(redis, "d0", Role.DECODE)
    await register(redis, "c0", Role.COLOCATED)
    d = make_dispatcher(redis, threshold=100)
    await d.refresh()
    assert d.choose_path(99) is ServePath.COLOCATED
    assert d.choose_path(100) is ServePath.DISAGGREGATED
    await redis.set(drain_key("p0"), "1")
    await d.refresh()
    assert d.choose_path(500) is ServePath.COLOCATED  # no pair left: everything goes colocated


async def test_full_prefill_queues_are_saturated_not_missing(redis):
    await register(redis, "p0", Role.PREFILL, InstanceLoad(queued_prompt_tokens=600))
    d = make_dispatcher(redis, max_queued=500)
    await d.refresh()
    assert d.pick(Role.PREFILL) is None and d.saturated(Role.PREFILL)


async def test_routers_see_what_the_others_saw_prefilled_on_each_pool(redis):
    await register(redis, "p0", Role.PREFILL)
    a, b = make_dispatcher(redis, "ra"), make_dispatcher(redis, "rb")
    start_s = time.monotonic()
    a.count_prefilled(Role.PREFILL, 500)  # (1) before b first reads a's count: b's baseline, not counted
    await a.refresh()
    b_first_read_s = time.monotonic()
    await b.refresh()
    assert b.others_prefilled(Role.PREFILL, start_s).tokens == 0
    a.count_prefilled(Role.PREFILL, 300)  # (2) then 300 more, and 40 on the colocated pool
    a.count_prefilled(Role.COLOCATED, 40)
    await a.refresh()
    await b.refresh()
    seen = b.others_prefilled(Role.PREFILL, start_s - 60)
    assert seen.tokens == 300
    # counted over the time since b first read a's count (b knows nothing before it), not the 60 s asked about
    assert 0 < seen.covered_s <= time.monotonic() - b_first_read_s
    assert b.others_prefilled(Role.COLOCATED, start_s).tokens == 0  # (first seen now: its baseline)
    assert b.others_prefilled(Role.PREFILL, time.monotonic() + 1).tokens == 0  # nothing after a later moment
    assert a.others_prefilled(Role.PREFILL, start_s).tokens == 0  # its own are not "the others'"
    assert b.outstanding("p0").prompt_tokens == 0  # the counts are not outstanding work on an instance
    await a.withdraw()


async def test_routers_see_how_long_the_others_refused_clients_hold_places(redis):
    await register(redis, "p0", Role.PREFILL)
    a, b = make_dispatcher(redis, "ra"), make_dispatcher(redis, "rb")
    a.publish_paced(Role.PREFILL, 30.0)
    before_s = time.time()
    await a.refresh()
    await b.refresh()
    seen = b.others_paced_s(Role.PREFILL)
    assert 30.0 - (time.time() - before_s) - 0.01 <= seen <= 30.001  # less the time since it was published
    assert b.others_paced_s(Role.COLOCATED) == 0.0 and a.others_paced_s(Role.PREFILL) == 0.0  # not its own
    a.publish_paced(Role.PREFILL, 0.0)  # its places have passed: no longer published
    await a.refresh()
    await b.refresh()
    assert b.others_paced_s(Role.PREFILL) == 0.0
    await a.withdraw()


async def test_two_routers_see_each_others_outstanding_work(redis):
    await register(redis, "d0", Role.DECODE)
    await register(redis, "d1", Role.DECODE)
    a, b = make_dispatcher(redis, "ra"), make_dispatcher(redis, "rb")
    await a.refresh()
    await b.refresh()
    first = a.pick(Role.DECODE)
    with a.lease(first.instance_id, sequences=1):
        assert a.pick(Role.DECODE).instance_id != first.instance_id  # its own lease counts at once
        await a.refresh()  # publishes
        await b.refresh()  # reads
        assert b.outstanding(first.instance_id).sequences == 1
        assert b.pick(Role.DECODE).instance_id != first.instance_id
    await a.refresh()
    await b.refresh()
    assert b.outstanding(first.instance_id).sequences == 0
    await a.withdraw()
