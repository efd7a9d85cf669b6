"""SLO-aware admission: a request that would wait past its target gets 429 with a Retry-After computed from
the queue; with no evidence of a stuck queue everything is admitted."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from router.admission import HONOURED_RETRY_AFTER_S, Admission, retry_count
from router.dispatch import Candidate, Outstanding, PeerPrefills, ServePath
from router.errors import Overloaded
from router.metrics import RouterMetrics
from tests.unit.router.router_testkit import (
    MODEL,
    FakeInstanceClient,
    asgi_client,
    make_router,
    register,
    register_pd,
)
from trt_disagg.contract import InstanceInfo, InstanceLoad, Role


@dataclass
class FakeDispatcher:
    queued: list[int]
    others_tokens: int = 0  # what the other routers saw prefilled within any window asked about ...
    others_covered_s: float = 10.0  # ... counted over this long

    def candidates(self, role: Role, exclude: frozenset[str] = frozenset()) -> list[Candidate]:
        info = InstanceInfo("p", role, "h", "g", "", "", 1, 1, 1, "f", "m")
        return [Candidate(info, InstanceLoad(queued_prompt_tokens=q), Outstanding()) for q in self.queued]

    def count_prefilled(self, role: Role, prompt_tokens: int) -> None:
        pass

    others_paced: float = 0.0  # seconds of places the other routers' refused clients hold
    published_paced: dict[Role, float] = field(default_factory=dict)

    def others_prefilled(self, role: Role, since_s: float) -> PeerPrefills:
        return PeerPrefills(self.others_tokens, self.others_covered_s)

    def publish_paced(self, role: Role, remaining_s: float) -> None:
        self.published_paced[role] = remaining_s

    def others_paced_s(self, role: Role) -> float:
        return self.others_paced


def test_wait_is_queue_over_measured_rate_and_retry_after_is_the_drain_past_the_target():
    now = [0.0]
    adm = Admission(FakeDispatcher(queued=[3000, 1000]), target_s=2.0, window_s=10.0,  # type: ignore[arg-type]
                    clock=lambda: now[0])
    adm.check(ServePath.DISAGGREGATED, 500)  # (1) no prefill measured yet: admitted
    for i in range(10):  # (2) 100 tokens done every second: 100 tokens/s served; calls took 2 s each (queued)
        now[0] = float(i)
        adm.prefilled(ServePath.DISAGGREGATED, 100, 2.0)
    assert adm.rate_tokens_per_s(ServePath.DISAGGREGATED) == pytest.approx(100.0)
    assert adm.estimated_wait_s(ServePath.DISAGGREGATED, 500) == pytest.approx(45.0)
    with pytest.raises(Overloaded) as refused:
        adm.check(ServePath.DISAGGREGATED, 500)
    assert refused.value.retry_after_s == pytest.approx(45.0 - 2.0)  # (3) until the queue drains to the target
    adm.check(ServePath.COLOCATED, 500)  # (4) another pool's rate is its own (none measured: admitted)
    now[0] = 9.0 + 0.5  # (5) a burst after idle time: two completions 0.5 s apart, 200 tokens each
    adm.prefilled(ServePath.DISAGGREGATED, 200, 0.1)
    assert adm.rate_tokens_per_s(ServePath.DISAGGREGATED) == pytest.approx((900 + 200) / 9.5)


def test_the_rate_is_what_the_pool_served_while_busy():
    """Time the pool had nothing queued (its clients had yet to come back) is not counted against it."""
    now = [0.0]
    pool = FakeDispatcher(queued=[500])
    adm = Admission(pool, target_s=2.0, window_s=30.0, clock=lambda: now[0])  # type: ignore[arg-type]
    for at_s in (0.0, 1.0, 2.0, 3.0):  # busy: 100 tokens a second
        now[0] = at_s
        adm.prefilled(ServePath.DISAGGREGATED, 100, 5.0)
    pool.queued[:] = [0]
    now[0] = 4.0
    adm.prefilled(ServePath.DISAGGREGATED, 100, 5.0)  # the last of its work: idle until 9 s
    pool.queued[:] = [500]
    for at_s in (9.0, 10.0):
        now[0] = at_s
        adm.prefilled(ServePath.DISAGGREGATED, 100, 5.0)
    # (each call took 5 s, queueing included: 20 tokens/s per call) busy 0-4 s and 9-10 s: 500 tokens in 5 s
    # (over the whole span it would be 600 in 10 s)
    assert adm.rate_tokens_per_s(ServePath.DISAGGREGATED) == pytest.approx(100.0)


def serving_100_tokens_a_second() -> tuple[FakeDispatcher, Admission, list[float]]:
    """A pool with 4000 prompt tokens queued that served 100 tokens a second for 10 s (a 2 s target): a
    request of 500 tokens would wait 45 s. Returns the pool, its admission and the clock to move."""
    now = [0.0]
    pool = FakeDispatcher(queued=[3000, 1000])
    adm = Admission(pool, target_s=2.0, window_s=10.0, clock=lambda: now[0])  # type: ignore[arg-type]
    for i in range(10):
        now[0] = float(i)
        adm.prefilled(ServePath.DISAGGREGATED, 100, 2.0)
    return pool, adm, now


def test_refused_clients_are_told_their_place_behind_those_refused_before_them():
    """Refused clients come back (OpenAI's SDKs retry a 429): each is told when the backlog it was refused for,
    and the prompts of the clients told to come back before it, will have drained; the queue lapses with time."""
    _, adm, now = serving_100_tokens_a_second()
    told = []
    for prompt in (500, 200, 300):  # three refusals at the same moment: waits 45, 42 and 43 s
        with pytest.raises(Overloaded) as refused:
            adm.check(ServePath.DISAGGREGATED, prompt)
        told.append(refused.value.retry_after_s)
    # the first: its backlog's excess (43 s); then each after the prompts before it (5 s, then 2 s more)
    assert told == pytest.approx([43.0, 48.0, 50.0])
    now[0] += 1.0  # a second later, a fourth: behind the three (their 10 s of prompts from 43 s), less the second
    with pytest.raises(Overloaded) as refused:
        adm.check(ServePath.DISAGGREGATED, 100)
    assert refused.value.retry_after_s == pytest.approx(53.0 - 1.0)
    assert adm.retry_queue_s(ServePath.DISAGGREGATED) == pytest.approx(53.0 + 1.0 - 1.0)  # what /metrics shows
    metrics = RouterMetrics()
    metrics.observe_admission(adm)
    rendered = metrics.render().decode()
    assert 'trtd_router_retry_queue_seconds{pool="disaggregated"} 53.0' in rendered
    assert "trtd_router_retry_return_share 1.0" in rendered  # none of the places has passed yet
    now[0] += 60.0  # long after all of them were due: its own backlog again
    with pytest.raises(Overloaded) as refused:
        adm.check(ServePath.DISAGGREGATED, 500)
    assert refused.value.retry_after_s == pytest.approx(43.0)


def test_with_other_routers_refused_clients_are_placed_behind_theirs_too():
    """Several routers on one pool: the clients each refused wait in one queue outside. A router places the
    clients it refuses after the places the others published, and publishes how long its own hold; places are
    spaced at the pool's pace, not at this router's share of it."""
    pool, adm, now = serving_100_tokens_a_second()
    pool.others_tokens = 1000  # another router's completions, as many as this one's: the pool serves 200 a second
    pool.others_paced = 60.0  # the other routers' refused clients hold 60 s of places (past this backlog)
    told = []
    for prompt in (500, 200, 300):
        with pytest.raises(Overloaded) as refused:
            adm.check(ServePath.DISAGGREGATED, prompt)
        told.append(refused.value.retry_after_s)
        assert pool.published_paced[Role.PREFILL] == pytest.approx(sum((500, 200, 300)[:len(told)]) / 200)
    assert told == pytest.approx([60.0, 62.5, 63.5])  # after theirs, then after the prompts told before it


def test_a_first_arrival_admitted_ahead_of_waiting_refused_clients_moves_their_places_back():
    pool, adm, now = serving_100_tokens_a_second()
    with pytest.raises(Overloaded):
        adm.check(ServePath.DISAGGREGATED, 500)  # told 43 s; the next refused client 48 s
    assert adm.retry_queue_s(ServePath.DISAGGREGATED) == pytest.approx(48.0)
    pool.queued[:] = [0]  # room again
    adm.check(ServePath.DISAGGREGATED, 100)  # a first arrival admitted: 1 s of prompt ahead of the refused
    assert adm.retry_queue_s(ServePath.DISAGGREGATED) == pytest.approx(49.0)
    adm.check(ServePath.DISAGGREGATED, 100, retry_count=1)  # a refused client back: it takes its own place
    assert adm.retry_queue_s(ServePath.DISAGGREGATED) == pytest.approx(49.0)
    assert [retry_count(h) for h in ({"x-stainless-retry-count": "1"}, {"x-stainless-retry-count": "0"}, {},
                                     {"x-stainless-retry-count": "one"})] == [1, 0, None, None]


def _three_refused(now: list[float], pool: FakeDispatcher | None = None) -> Admission:
    """100 tokens/s, 150 queued, target 2 s: three 100-token refusals at 0 s, told 0.5, 1.5 and 2.5 s."""
    pool = pool or FakeDispatcher(queued=[150])
    adm = Admission(pool, target_s=2.0, clock=lambda: now[0])  # type: ignore[arg-type]
    adm.prefilled(ServePath.DISAGGREGATED, 100, 1.0)
    told = []
    for _ in range(3):
        with pytest.raises(Overloaded) as refused:
            adm.check(ServePath.DISAGGREGATED, 100)
        told.append(refused.value.retry_after_s)
    assert told == pytest.approx([0.5, 1.5, 2.5])
    return adm


def _told(adm: Admission, retry_count: int | None = 0) -> float:
    with pytest.raises(Overloaded) as refused:
        adm.check(ServePath.DISAGGREGATED, 100, retry_count=retry_count)
    return refused.value.retry_after_s


def test_places_of_clients_that_do_not_come_back_are_given_up():
    """A place nobody claimed (router/returns.py) lowers the share of clients taken to come back, and the
    queue of places shrinks with it at once: later clients are not told to wait for work that is not there."""
    now = [0.0]
    pool = FakeDispatcher(queued=[150])
    adm = _three_refused(now, pool)  # places due at 0.5, 1.5, 2.5; the queue ends at 3.5
    now[0] = 1.6
    # a new client at 1.6: the place due at 0.5 was passed by unclaimed (share 1/2), so what is left of the
    # queue (1.9 s) counts half: its place is at 1.6 + 0.95
    assert _told(adm) == pytest.approx(0.95)
    now[0] = 2.6  # the place due at 1.5 passed too (share 1/3): this client's own backlog comes first
    assert _told(adm) == pytest.approx(0.5)
    assert adm.returns.share() == pytest.approx(1 / 3)
    # the queue now ends at 2.9 + (3.1 - 2.9 + 1) / 3 = 3.3. A client refused at a moment the queue looked 3 s
    # longer is told its own excess (3.5 s), but the backlog still ends where the latest refusals' excess
    # (0.5 s) says: the queue's end moves by a third of its prompt only
    pool.queued[:] = [450]
    with pytest.raises(Overloaded) as refused:
        adm.check(ServePath.DISAGGREGATED, 100)
    assert refused.value.retry_after_s == pytest.approx(3.5)
    pool.queued[:] = [150]
    assert _told(adm) == pytest.approx(3.3 + 1 / 3 - 2.6)


def test_places_of_clients_that_come_back_are_kept():
    now = [0.0]
    adm = _three_refused(now)
    now[0] = 1.2  # the first one back (refused again) claims its place: the queue is whole, it goes to its end
    assert _told(adm, retry_count=1) == pytest.approx(3.5 - 1.2)
    now[0] = 2.2  # the second back, 0.7 s late but within the grace: still a return
    assert _told(adm, retry_count=1) == pytest.approx(4.5 - 2.2)
    assert adm.returns.share() == 1.0


def test_a_client_that_does_not_say_its_retry_count_is_told_the_queue_but_takes_no_place():
    """Its return could not claim a place (the router tells a retry by the header alone), so holding one would
    only make later clients wait for a prompt that never comes: it is told the queue as it is."""
    now = [0.0]
    adm = _three_refused(now)  # the queue ends at 3.5
    assert _told(adm, retry_count=None) == pytest.approx(3.5)
    assert _told(adm, retry_count=None) == pytest.approx(3.5)
    assert adm.retry_queue_s(ServePath.DISAGGREGATED) == pytest.approx(3.5)
    assert _told(adm) == pytest.approx(3.5)  # an SDK client's first attempt takes the next place


def test_a_client_told_to_wait_longer_than_an_sdk_waits_takes_no_place():
    """openai-python does not retry past two minutes: such a client is not coming back, so the clients refused
    after it are not told to wait for its prompt."""
    adm = Admission(FakeDispatcher(queued=[20000]), target_s=2.0, clock=lambda: 0.0)  # type: ignore[arg-type]
    adm.prefilled(ServePath.DISAGGREGATED, 100, 1.0)  # 100 tokens/s: 200 s of queue
    with pytest.raises(Overloaded) as refused:
        adm.check(ServePath.DISAGGREGATED, 100)
    assert refused.value.retry_after_s == pytest.approx(199.0) and 199.0 > HONOURED_RETRY_AFTER_S
    assert adm.retry_queue_s(ServePath.DISAGGREGATED) == 0.0


def test_a_short_queue_is_admitted():
    adm = Admission(FakeDispatcher(queued=[50]), target_s=2.0, clock=lambda: 0.0)  # type: ignore[arg-type]
    adm.prefilled(ServePath.DISAGGREGATED, 100, 0.5)  # light load: one call, 200 tokens/s, no queue
    assert adm.rate_tokens_per_s(ServePath.DISAGGREGATED) == pytest.approx(200.0)
    adm.check(ServePath.DISAGGREGATED, 300)  # (50 + 300) / 200 = 1.75 s


def test_time_already_spent_in_the_router_counts_and_an_idle_pool_keeps_the_capacity_it_showed():
    now = [0.0]
    adm = Admission(FakeDispatcher(queued=[50]), target_s=2.0, clock=lambda: now[0])  # type: ignore[arg-type]
    adm.prefilled(ServePath.DISAGGREGATED, 100, 0.5)  # 200 tokens/s
    assert adm.check(ServePath.DISAGGREGATED, 300) == pytest.approx(1.75)  # the forecast time to first token
    with pytest.raises(Overloaded) as late:  # 0.5 s lost in the router before admission: 2.25 s in all
        adm.check(ServePath.DISAGGREGATED, 300, waited_s=0.5)
    # sent again at once, it waits in the router's queue again while the pool drains: the pool's wait alone
    # decides when it fits (1.75 s from now, within the target)
    assert late.value.retry_after_s == pytest.approx(0.0)
    now[0] = 60.0  # idle for longer than the window, then a burst: forecast from the 200 tokens/s it showed
    assert adm.rate_tokens_per_s(ServePath.DISAGGREGATED) == pytest.approx(200.0)
    with pytest.raises(Overloaded):
        adm.check(ServePath.DISAGGREGATED, 500)  # (50 + 500) / 200 = 2.75 s


def test_completions_leave_the_window_as_time_passes_with_none_arriving():
    """The window is built once per change, and time alone changes it: its oldest completions expire."""
    now = [0.0]
    adm = Admission(FakeDispatcher(queued=[100]), target_s=2.0, window_s=10.0,  # type: ignore[arg-type]
                    clock=lambda: now[0])
    for second, tokens in enumerate([100] * 5 + [300] * 5):  # a completion a second, work always queued
        now[0] = float(second)
        adm.prefilled(ServePath.DISAGGREGATED, tokens, 5.0)
    assert adm.rate_tokens_per_s(ServePath.DISAGGREGATED) == pytest.approx((4 * 100 + 5 * 300) / 9.0)
    now[0] = 14.5  # nothing new; the first five (100 tokens each) are older than the window now
    assert adm.rate_tokens_per_s(ServePath.DISAGGREGATED) == pytest.approx(4 * 300 / 4.0)


def test_with_other_routers_a_router_replays_its_share_of_the_pool_queue():
    """Two routers take turns on one pool: each sees half of its completions. The pool's queue (every
    router's work) drains when this router's completions are through half of it, not all of it. A router
    with none of the window's completions (just started) goes by the pace the other routers saw."""
    now = [0.0]
    pool = FakeDispatcher(queued=[1000])
    adm = Admission(pool, target_s=2.0, window_s=10.0, clock=lambda: now[0])  # type: ignore[arg-type]
    for second in range(9):  # this router's 100 tokens a second; the pool serves 200 a second
        now[0] = float(second)
        adm.prefilled(ServePath.DISAGGREGATED, 100, 5.0)
    now[0] = 8.0
    alone = adm.forecast(ServePath.DISAGGREGATED, 200)
    pool.others_tokens = 900  # the other router's completions over the same window
    shared = adm.forecast(ServePath.DISAGGREGATED, 200)
    assert alone is not None and shared is not None
    assert alone.bound_s == pytest.approx(12.0)  # 1200 tokens at this router's 100 a second
    assert shared.bound_s == pytest.approx(6.0)  # its half of them: 1200 tokens at the pool's 200 a second
    now[0] = 30.0  # none of the window's prefills were this router's, 2000 tokens were the other's
    pool.others_tokens = 2000
    forecast = adm.forecast(ServePath.DISAGGREGATED, 200)
    assert forecast is not None and forecast.bound_s == pytest.approx(1200 / (2000 / 10.0))  # the pool's pace
    started = Admission(FakeDispatcher(queued=[1000], others_tokens=2000), target_s=2.0,  # type: ignore[arg-type]
                        clock=lambda: 0.0)
    with pytest.raises(Overloaded):  # a router that just started, none of its own prefills back yet: the same
        started.check(ServePath.DISAGGREGATED, 200)
    # up 2 s, it has read 400 tokens of the others' (their 200 a second): the pool's pace is over those 2 s,
    # not over the window it has not seen (that would be 40 a second, and every request refused)
    up_2s = Admission(FakeDispatcher(queued=[0], others_tokens=400, others_covered_s=2.0),  # type: ignore[arg-type]
                      target_s=2.0, clock=lambda: 2.0)
    assert up_2s.check(ServePath.DISAGGREGATED, 200) == pytest.approx(1.0)


def test_a_clumped_pool_is_forecast_from_where_now_falls_between_its_clumps():
    """First tokens come back in clumps (1000 tokens at once, every second): the wait depends on how long until
    the next clump, which a rate alone cannot tell; a 429's Retry-After is when the router admits again."""
    now = [0.0]
    queue = FakeDispatcher(queued=[5000])
    adm = Admission(queue, target_s=0.5, window_s=10.0, clock=lambda: now[0])  # type: ignore[arg-type]
    for second in range(9):  # (1) a busy pool: 5 x 200 tokens complete together at each whole second
        now[0] = float(second)
        for _ in range(5):
            adm.prefilled(ServePath.DISAGGREGATED, 200, 0.5)
    queue.queued[:] = [800]
    now[0] = 8.25  # (2) a quarter second after the last clump, 1000 tokens ahead: served by the next one
    assert adm.estimated_wait_s(ServePath.DISAGGREGATED, 200) == pytest.approx(0.75)
    assert 1000 / adm.rate_tokens_per_s(ServePath.DISAGGREGATED) > 0.9  # (the fluid estimate: 0.9 s)
    with pytest.raises(Overloaded) as refused:
        adm.check(ServePath.DISAGGREGATED, 200)
    assert refused.value.retry_after_s == pytest.approx(0.25)
    now[0] += refused.value.retry_after_s  # (3) back after Retry-After, nothing admitted meanwhile: admitted
    adm.check(ServePath.DISAGGREGATED, 200)
    assert adm.estimated_wait_s(ServePath.DISAGGREGATED, 1200) == pytest.approx(1.5)  # (4) two clumps ahead


def test_admission_judges_by_the_p90_and_retry_after_tells_the_likely_drain():
    """Clumps come in threes 0.2 s apart, then a second's pause: a tenth of a second after a clump the next
    one is 0.1 s away two times in three, 0.9 s away one time in three. Admission refuses on the 0.9 s; the
    client is told the likely 0.1 s past the target, not the 0.85 s the bound is past it."""
    now = [0.0]
    queue = FakeDispatcher(queued=[5000])
    adm = Admission(queue, target_s=0.05, window_s=10.0, clock=lambda: now[0])  # type: ignore[arg-type]
    for period in range(6):
        for offset_s in (0.0, 0.2, 0.4):
            now[0] = 1.4 * period + offset_s
            for _ in range(5):
                adm.prefilled(ServePath.DISAGGREGATED, 200, 0.5)
    queue.queued[:] = [800]
    now[0] += 0.1
    forecast = adm.forecast(ServePath.DISAGGREGATED, 200)
    assert forecast is not None
    assert (forecast.bound_s, forecast.likely_s) == (pytest.approx(0.9), pytest.approx(0.1))
    with pytest.raises(Overloaded) as refused:
        adm.check(ServePath.DISAGGREGATED, 200)
    assert refused.value.retry_after_s == pytest.approx(0.1 - 0.05)


def test_moments_when_the_pool_ran_out_of_work_are_not_replayed():
    """A lightly loaded pool finishes each prompt and idles: its pace is the arrivals', so the replay has no
    answer and the fluid estimate (queue over the measured rate) stands."""
    now = [0.0]
    adm = Admission(FakeDispatcher(queued=[0]), target_s=2.0, clock=lambda: now[0])  # type: ignore[arg-type]
    for second in range(9):
        now[0] = float(second)
        adm.prefilled(ServePath.DISAGGREGATED, 100, 0.25)
    assert adm.replayed_drain_s(ServePath.DISAGGREGATED, 300) is None
    assert adm.estimated_wait_s(ServePath.DISAGGREGATED, 300) == pytest.approx(300 / 400)


async def test_the_router_answers_429_with_the_computed_retry_after(valkey_url, redis):
    await register_pd(redis)
    app = make_router(valkey_url, FakeInstanceClient(), admission_target_s=1.0, refresh_interval_s=30.0)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
    async with asgi_client(app) as http:
        assert (await http.post("/v1/completions", json=body)).status_code == 200  # a prefill measured
        await register(redis, "prefill-0", Role.PREFILL, InstanceLoad(queued_prompt_tokens=10**12))
        await app.state.router.dispatcher.refresh()
        admission = app.state.router.runner.admission
        checked = []
        check = admission.check
        admission.check = lambda *a, **kw: (checked.append(kw["retry_count"]), check(*a, **kw))[1]
        resp = await http.post("/v1/completions", json=body)
        again = await http.post("/v1/completions", json=body, headers={"x-stainless-retry-count": "1"})
        wait_s = admission.estimated_wait_s(ServePath.DISAGGREGATED, 5)
    assert checked == [None, 1]  # the SDK's retry count reaches admission, and its absence
    assert again.status_code == 429
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "overloaded"
    assert int(resp.headers["Retry-After"]) == math.ceil(wait_s - 1.0)
    assert int(resp.headers["retry-after-ms"]) == pytest.approx(1000 * (wait_s - 1.0), rel=0.01)
