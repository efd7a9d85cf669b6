"""KV-aware routing: overlap against load, the fallbacks to least-loaded, and conditional disaggregation by
overlap (which decode/colocated instance prefills a short suffix itself)."""

from __future__ import annotations

from router.dispatch import Candidate, Dispatcher, InstanceView, Outstanding, Snapshot, make_policy
from router.kv_index import KVIndex
from router.kv_routing import KVAware, KVRouting
from trt_disagg.contract import InstanceInfo, InstanceLoad, Role
from trt_disagg.kv_events import KVEvent, KVEventKind, block_hashes

TPB = 16


def info(i: str, role: Role = Role.DECODE) -> InstanceInfo:
    return InstanceInfo(i, role, "h", "g", "h", "k", 1, 1, 1600, "model-x", role.value)


def cand(i: str, *, matched: int, prompt: int = 320, queued: int = 0, free: int = 100) -> Candidate:
    return Candidate(info(i), InstanceLoad(queued_prompt_tokens=queued, free_kv_blocks=free, total_kv_blocks=100),
                     Outstanding(), prompt_tokens=prompt, matched_tokens=matched)


def test_overlap_wins_until_the_load_outweighs_it() -> None:
    policy = KVAware()
    assert policy.choose(Role.DECODE, [cand("a", matched=0), cand("b", matched=256)]).info.instance_id == "b"
    # b holds 256 of 320 tokens but has 1000 prompt tokens queued: a (no hit, idle) is cheaper
    busy = [cand("a", matched=0), cand("b", matched=256, queued=1000)]
    assert policy.choose(Role.DECODE, busy).info.instance_id == "a"
    # the weights say how much a cached token is worth against a queued one
    heavy = KVAware(kv_overlap_score_weight=10.0)
    assert heavy.choose(Role.DECODE, busy).info.instance_id == "b"


def test_no_hit_anywhere_or_a_full_best_falls_back_to_least_loaded() -> None:
    policy = make_policy("kv_aware", kv_overlap_score_weight=1.0, kv_load_weight=1.0)
    cold = [cand("a", matched=0), cand("b", matched=0)]
    assert {policy.choose(Role.DECODE, cold).info.instance_id for _ in range(2)} == {"a", "b"}  # turns
    # b has the prefix but no free KV for the rest: least-loaded (a, with free KV) takes it
    full = [cand("a", matched=0), cand("b", matched=256, free=0)]
    assert policy.choose(Role.DECODE, full).info.instance_id == "a"
    assert policy.choose(Role.DECODE, []) is None


def dispatcher_with(index: KVIndex, max_local: int, views: dict[Role, list[InstanceView]]) -> Dispatcher:
    d = Dispatcher(None, "r", make_policy("kv_aware"), colocated_threshold_tokens=0,
                   max_queued_prompt_tokens=10_000, publish_ttl_s=1.0)
    d.snapshot = Snapshot(views, {})
    d.kv = KVRouting(index, max_local)
    return d


def test_local_prefill_goes_to_the_instance_holding_all_but_a_short_suffix() -> None:
    prompt = list(range(1000, 1330))  # 330 tokens: 20 full blocks + 10
    hashes = block_hashes(prompt, TPB, b"model-x")
    index = KVIndex()
    index.set_members({"d0": 1600, "d1": 1600, "c0": 1600})
    for iid, n in (("d0", 20), ("d1", 8), ("c0", 12)):
        index.apply(KVEvent(iid, 1, KVEventKind.CLEARED, epoch=1))
        index.apply(KVEvent(iid, 2, KVEventKind.STORED, tuple(hashes[:n]), None, TPB, epoch=1))
    load = InstanceLoad(free_kv_blocks=100, total_kv_blocks=100)
    views = {Role.DECODE: [InstanceView(info("d0"), load, False), InstanceView(info("d1"), load, False)],
             Role.COLOCATED: [InstanceView(info("c0", Role.COLOCATED), load, False)]}
    d = dispatcher_with(index, 16, views)
    match = d.kv.local_target(d, prompt) if d.kv else None
    assert match is not None and match.instance.instance_id == "d0" and match.matched_tokens == 320
    assert d.pick(Role.DECODE, prompt_ids=prompt).instance_id == "d0"
    # a suffix longer than the threshold goes the usual way
    assert dispatcher_with(index, 8, views).kv.local_target(d, prompt) is None  # type: ignore[union-attr]
    # the holder lost (excluded): the next best that qualifies, or none
    assert d.kv.local_target(d, prompt, frozenset({"d0"})) is None  # type: ignore[union-attr]
