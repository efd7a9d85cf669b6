"""SLO-aware admission: refuse (429) a request that would wait longer than its target, with a Retry-After
computed from the queue, instead of admitting work that cannot be served in time.

    queue          = prompt tokens outstanding on the pool: the larger of what the instances published and what
                     the routers have outstanding there (dispatch.Candidate), the figure dispatch balances on;
                     this router's own leases make it exact between heartbeats
    estimated wait = the time the pool takes to prefill (queue + this prompt) tokens from now, replayed from
                     its completions of the last window_s (below), at p90 (the target is met at p90); the
                     fluid (queue + prompt) / prefill rate while the window holds too few of them. A router
                     sees only the completions of its own requests: with other routers sending to the pool,
                     the pool is through (queue + prompt) when this router's completions are through its share
                     of it (its part of the tokens prefilled in the window, from the counts routers publish:
                     router/dispatch.py), so that share is what it replays
    refuse when waited + estimated wait > target (request_timeout_s, or the TTFT SLO with
                     admission_target=ttft); waited: what the request spent at the router before admission
                     (its connection in the accept queue, the event loop: router/received.py)
    Retry-After    = when the work ahead of this client has drained to the target: the backlog it was
                     refused for (likely wait - target, the likely wait being the forecast's median; the time
                     it waited in the router passes again, and the pool drains meanwhile, when it comes back),
                     and behind that the prompts of the clients refused before it that were told to come back
                     sooner, as many of them as come back (below); whole seconds, `retry-after-ms` has it to the
                     millisecond

Why the median for Retry-After when admission uses the p90: the two answer different questions. Admission
promises the request it takes a first token within the target nine times in ten, so it must judge by a wait
exceeded only one time in ten. Retry-After is a forecast the client acts on, and its best value is the most
likely drain, not a bound: told the p90's excess, the typical client waits longer than it had to. Measured on
the tiny deployment at 4x overload: refused on the p90 and told its excess, clients were told p50 0.16 s while
the router admitted again within 34 ms (p50) of a 429, and the work admitted before each 429 had drained to the
target at once in every case (admitted TTFT p90 1.6 s against 2 s); the median's excess agreed within 2x (or
0.1 s) with the next admission for 96% of the 429s and with that drain for 99%, the p90's for 55% and 35%.
Where the forecast is fluid (too few replays) the two are the same.

Why a replay and not only a rate: first tokens do not come back at a steady rate. An engine prefills a
batch at a time, and a saturated pool stalls while its KV waits to be pulled, so completions arrive in
clumps (on the tiny deployment at 4x overload: ~50 within 50 ms, then nothing for 1.5-2 s). With a rate
alone the estimate is a staircase that moves only when a clump lands, and it is blind to where between two
clumps "now" is: a request admitted just before a clump waits far less than one admitted just after it,
and a 429's Retry-After is unrelated to when the next clump lets requests in. The replay asks the window
the question directly: from each past moment that was as long after a completion as now is after the
latest one, how long did it take until that many more tokens were prefilled, with the pool busy all along
(had it run out of work, its pace was the arrivals', not its own)? The 90th percentile of the answers is
the forecast. On a smooth pool it is the fluid estimate; on a clumped one it follows the clumps.

Why Retry-After counts the clients refused before this one: they come back. OpenAI's SDKs retry a 429 by
default (openai-python: twice, after `retry-after-ms` when it is under two minutes), so under overload the
refused clients are a queue of their own, outside the router, that drains into the pool as fast as the pool
takes work and no faster. Announced only the backlog each was refused for (the same for all of them, held at
the target by admission: ~0 past it), they all come back at once, are refused again together and give up after
their retries; their returns also pile into the router's accept queue, which then delays the requests it
admits (measured at 4x overload with clients retrying as openai-python does: admitted TTFT p90 3-7 s against a
2 s target). So each refusal takes the next place in that outside queue: the first is told the backlog's
excess, each later one the place after the prompts of those told before it, at the pool's measured prefill
rate (`_paced_until`; it lapses on its own once the router stops refusing; /metrics shows it). With several
routers on a pool the outside queue is one: each router publishes until when its own refused clients hold
places (router/dispatch.py) and places the clients it refuses after all of them. Admission itself is unchanged
(it reserves nothing: a client that never comes back costs no capacity), so a request arriving for the first
time and admitted while refused clients wait for their places took pool time ahead of them: their queue moves
back by its prompt. Whether a request is a retry the client says (`x-stainless-retry-count`, sent by OpenAI's
SDKs on every attempt, 0 on the first); a retry admitted takes the place it was given and moves nothing. A
client that says nothing (curl, a load generator, a plain HTTP library) is told the queue as it is and takes
no place: its return could not be told from a first arrival, so a place held for it could never be claimed and
would only delay the clients after it. Places are only worth holding for clients that come back: each counts
by the share of refused clients that did lately (router/returns.py: retries claim places, places passed by
unclaimed settle), and the queue already handed out is rescaled whenever that share moves, so SDK clients that
never return (`max_retries=0`) soon stop lengthening the places of those after them. One told more than an SDK
waits, two minutes, takes no place.


The rate (for the fluid fallback, and the spacing of places) is the larger of two measured lower bounds of the
pool's capacity: the prompt tokens it finished per second of the window's busy time (from a completion that
left work queued to the next: exact while it is saturated, and idle stretches do not count), and the tokens
per second of its recent prefill calls, queueing included (exact while it is not). Both are measured, not
modelled: they follow the engine as served on this machine, whatever its load. With other routers on the pool,
this rate is of this router's completions, its share of the pool's: the places (one queue for all routers) are
spaced at the pool's pace, the rate scaled by all routers' prefilled tokens over its own. A pool that finished
nothing within the window keeps the rate it last showed: a burst after idle time is forecast from the capacity
the pool had, not admitted whole until its first prefill comes back. A router with none of the window's
prefills of its own while other routers saw some (it has just started behind a load balancer) goes by the pace
they saw, over the time it has been reading their counts (its uptime, while that is shorter than the window;
the idle time within it counts too, which errs towards refusing). With no prefill ever finished there is no
evidence of a queue that does not move, and everything is admitted.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import accumulate, pairwise
from statistics import median

from router.dispatch import Dispatcher, PeerPrefills, ServePath
from router.errors import Overloaded
from router.returns import Returns
from trt_disagg.contract import Role

POOL_ROLE = {ServePath.DISAGGREGATED: Role.PREFILL, ServePath.COLOCATED: Role.COLOCATED}
# openai-python (_constants.MAX_RETRY_AFTER_DELAY) does not retry at all when told to wait longer than this:
# a client told more is not coming back and takes no place among those that are
HONOURED_RETRY_AFTER_S = 120.0
# Sent by the OpenAI SDKs (openai-python, openai-node: Stainless-generated clients) on every request: how many
# times this one was sent before. A client without it counts as arriving for the first time.
RETRY_COUNT_HEADER = "x-stainless-retry-count"
MIN_REPLAYS = 5  # fewer past moments like now than this: the fluid estimate instead of a quantile of noise
MAX_REPLAYS = 64  # past moments replayed per estimate (evenly spread over the window): bounds its cost
EXCESS_MEMORY = 21  # refusals whose median excess says where the pool's backlog ends, for the queue behind it
WAIT_QUANTILE = 0.9  # the admission target holds at p90: the wait a request admitted now sees at p90


def quantile_of(sorted_xs: list[float], q: float) -> float:
    """The q-quantile of a sorted, non-empty list (nearest rank below)."""
    return sorted_xs[int(q * (len(sorted_xs) - 1))]


@dataclass(frozen=True, slots=True)
class Forecast:
    """A request's forecast wait for its prefill: the bound admission judges by, and the likeliest value."""

    bound_s: float  # WAIT_QUANTILE: exceeded one time in ten
    likely_s: float  # the median: what a Retry-After tells the client


def retry_count(headers: Mapping[str, str]) -> int | None:
    """How many times the client says it sent this request before (under overload: was refused); None when it
    does not say (curl, a load generator, an HTTP library: a client the router cannot see come back)."""
    count = headers.get(RETRY_COUNT_HEADER, "")
    return int(count) if count.isdigit() else None


@dataclass(frozen=True, slots=True)
class Prefilled:
    """A prefill that finished on a pool: its first token came back."""

    at_s: float  # when (the admission clock)
    prompt_tokens: int
    duration_s: float  # from the call to the first token, queueing included
    queued_after: int  # prompt tokens still outstanding on the pool right after it


@dataclass(frozen=True, slots=True)
class _Window:
    """The window's completions as the rate and the replay read them. Built once per change of the window (a
    completion comes in or expires), not once per check: under overload every arrival is checked, dozens
    between two completions, and rebuilding these per check took ~7% of the router's time at 4x overload."""

    done: list[Prefilled]
    times: list[float]
    served: list[int]  # served[k]: prompt tokens of completions 0..k
    idle: list[int]  # idle[k]: the latest completion at or before k that left the pool with no work (-1: none)
    rate: float | None  # tokens per second (rate_tokens_per_s); None with no completion in the window


def _build_window(done: list[Prefilled]) -> _Window:
    times = [c.at_s for c in done]
    served = list(accumulate(c.prompt_tokens for c in done))
    idle = list(accumulate((k if c.queued_after == 0 else -1 for k, c in enumerate(done)), max))
    rate = None
    if done:
        per_call = served[-1] / max(1e-6, sum(c.duration_s for c in done))
        # what the pool served while it was busy: from each completion that left work queued to the next, the
        # next one's prompt. Idle time (between bursts, or while refused clients have yet to come back) would
        # otherwise dilute the rate, inflate every wait it forecasts and space the refused clients' places
        # wider than the pool serves them, which leaves it idler still.
        busy_tokens, busy_s = 0, 0.0
        for before, after in pairwise(done):
            if before.queued_after > 0:
                busy_tokens += after.prompt_tokens
                busy_s += after.at_s - before.at_s
        rate = max(busy_tokens / busy_s if busy_s > 0 else 0.0, per_call)
    return _Window(done, times, served, idle, rate)


class Admission:
    def __init__(self, dispatcher: Dispatcher, *, target_s: float, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._dispatch = dispatcher
        self._clock = clock
        self.target_s = target_s
        self._window_s = window_s
        self._done: dict[ServePath, deque[Prefilled]] = {p: deque() for p in ServePath}
        self._windows: dict[ServePath, _Window] = {}  # built from _done; dropped whenever _done changes
        self._last_rate: dict[ServePath, float] = {}  # the rate of the latest window that had completions
        # when the clients refused so far will have had their prompts prefilled, if they come back when told,
        # each weighted by the share of refused clients that do (_paced_share: the share it is expressed at)
        self._paced_until: dict[ServePath, float] = {}
        self._paced_share: dict[ServePath, float] = {}
        self._recent_excess: dict[ServePath, deque[float]] = {p: deque(maxlen=EXCESS_MEMORY) for p in ServePath}
        self.returns = Returns()  # which share of refused clients come back: a property of clients, not pools

    def prefilled(self, path: ServePath, prompt_tokens: int, duration_s: float) -> None:
        """A prefill of `prompt_tokens` finished on `path`'s pool (its first token came back) after
        `duration_s` from the call."""
        queued = 0
        if path in POOL_ROLE:
            queued = self.queued_tokens(path)
            self._dispatch.count_prefilled(POOL_ROLE[path], prompt_tokens)
        self._done[path].append(Prefilled(self._clock(), prompt_tokens, duration_s, queued))
        self._windows.pop(path, None)
        self._expire(path)

    def queued_tokens(self, path: ServePath) -> int:
        """Prompt tokens outstanding on `path`'s pool (published, or leased by the routers: the larger)."""
        return sum(c.queued_prompt_tokens for c in self._dispatch.candidates(POOL_ROLE[path]))

    def rate_tokens_per_s(self, path: ServePath) -> float | None:
        rate = self._window(path).rate
        if rate is None:  # idle for a window: the capacity it last showed, not none (a burst's first second)
            return self._last_rate.get(path)
        self._last_rate[path] = rate
        return rate

    def _pool_rate(self, path: ServePath) -> float | None:
        """The pool's prefill rate, for the spacing of places: this router's (rate_tokens_per_s) is that of its
        own completions, its share of the pool's when other routers send there too. The places every router
        hands out make one queue, so each is spaced at the pool's pace: at this router's alone, two routers'
        queues together would announce twice the wait."""
        rate = self.rate_tokens_per_s(path)
        own, others = self._window_tokens(path)
        return rate * (own + others.tokens) / own if rate and own and others.tokens else rate

    def _window_tokens(self, path: ServePath) -> tuple[int, PeerPrefills]:
        """Prompt tokens prefilled on `path`'s pool within the window: this router's, and the other routers'."""
        served = self._window(path).served
        return (served[-1] if served else 0,
                self._dispatch.others_prefilled(POOL_ROLE[path], self._clock() - self._window_s))

    def _window(self, path: ServePath) -> _Window:
        self._expire(path)
        if (window := self._windows.get(path)) is None:
            window = self._windows[path] = _build_window(list(self._done[path]))
        return window

    def _expire(self, path: ServePath) -> None:
        done, oldest_s = self._done[path], self._clock() - self._window_s
        while done and done[0].at_s < oldest_s:
            done.popleft()
            self._windows.pop(path, None)

    def replayed_drain_s(self, path: ServePath, tokens: int, quantile: float = WAIT_QUANTILE) -> float | None:
        """Seconds until `tokens` more prompt tokens are prefilled on `path`'s pool, replayed from the window
        (module docstring): the `quantile` of what it took from past moments as long after a completion as now;
        None when fewer than MIN_REPLAYS such moments have an answer in the window."""
        drains = self._replayed_drains(path, tokens)
        return None if drains is None else quantile_of(drains, quantile)

    def _replayed_drains(self, path: ServePath, tokens: int) -> list[float] | None:
        """What it took, from each replayed past moment, until `tokens` more were prefilled (sorted)."""
        window = self._window(path)
        done, times, served, idle = window.done, window.times, window.served, window.idle
        if len(done) < 2:
            return None
        since_last_s = self._clock() - times[-1]
        drains = []
        for i in range(0, len(done) - 1, max(1, len(done) // MAX_REPLAYS)):
            start_s = times[i] + since_last_s
            before = bisect_right(times, start_s) - 1  # the latest completion at or before the start
            end = bisect_left(served, served[before] + tokens)
            # no answer when the window ends before that many were served, or when the pool ran out of work
            # on the way (then its pace was the arrivals', not its own)
            if end < len(done) and idle[end - 1] < before:
                drains.append(times[end] - start_s)
        return sorted(drains) if len(drains) >= MIN_REPLAYS else None

    def forecast(self, path: ServePath, prompt_tokens: int) -> Forecast | None:
        """How long a request of `prompt_tokens` sent to `path`'s pool now would wait for its prefill: the
        replay's WAIT_QUANTILE and median, or the fluid estimate for both; None with no rate measured."""
        ahead = self.queued_tokens(path) + prompt_tokens  # the pool's, from every router
        own_tokens, others = self._window_tokens(path)
        others_tokens = others.tokens
        if others_tokens and not own_tokens:
            # none of the window's prefills were this router's (it has just started, or had no traffic): the
            # pool's pace as the other routers saw it, not everything admitted until a prefill of its own
            # returns; over the time their counts cover, which for a router that just started is its uptime,
            # not the window (over the window, its first seconds would see the pool window / uptime too slow)
            pool_s = ahead * others.covered_s / others_tokens
            return Forecast(pool_s, pool_s)
        rate = self.rate_tokens_per_s(path)
        if rate is None:
            return None
        # this router's completions are its share of the pool's: the pool is through `ahead` when they are
        # through that share of it
        ahead = math.ceil(ahead * own_tokens / (own_tokens + others_tokens)) if others_tokens else ahead
        if (drains := self._replayed_drains(path, ahead)) is None:
            return Forecast(ahead / rate, ahead / rate)
        return Forecast(quantile_of(drains, WAIT_QUANTILE), quantile_of(drains, 0.5))

    def estimated_wait_s(self, path: ServePath, prompt_tokens: int) -> float | None:
        """The wait admission judges by (the forecast's WAIT_QUANTILE); None with no rate measured."""
        forecast = self.forecast(path, prompt_tokens)
        return None if forecast is None else forecast.bound_s

    def check(self, path: ServePath, prompt_tokens: int, waited_s: float = 0.0,
              retry_count: int | None = 0) -> float | None:
        """Raise Overloaded (429 + Retry-After) when this request would wait longer than the target. A LOCAL
        request prefills a short suffix on the instance holding its prefix: no prefill queue to wait in.
        `waited_s` is how long the request has already spent at the router (its connection in the accept queue,
        router/accept_queue.py; then the event loop, body, tokenizer): under overload that is part of the
        client's wait too, and only this request can see it.
        Retry-After: the likely (median) wait over the target, or, when that is sooner, the place after the
        clients refused before (module docstring). `retry_count`: what the client says (RETRY_COUNT_HEADER); a
        first-time request (0, or None: it does not say) admitted while refused clients wait for their places
        takes pool time ahead of them, so their queue moves back by its prompt. A refused client that does not
        say takes no place: its return could not claim one, so it is told the queue as it is.
        Returns the forecast time to first token of an admitted request (None: not forecast)."""
        retry = bool(retry_count)
        self.returns.arrived(self._clock() - max(0.0, waited_s), retry)
        if path not in POOL_ROLE:
            return None
        forecast = self.forecast(path, prompt_tokens)
        if forecast is None:
            return None
        waited_s = max(0.0, waited_s)
        total_s = waited_s + forecast.bound_s
        if total_s <= self.target_s:
            if not retry:
                self._jumped_ahead(path, prompt_tokens)
            return total_s
        # the pool's likely wait over the target, without the time this request spent in the router: a client
        # sent again d from now waits in the router's queue too (as long, if it is as long then), and the pool
        # drains meanwhile, so its time to first token from its send is the pool's wait from now minus d
        # whatever that queue is. Measured at 4x overload: with this request's wait in the router added, 64% of
        # the 429s agreed within 2x (or 0.1 s) with the router's next admission and 74% with the drain of the
        # work admitted before them; without it, 78% and 93% (the same run's router, replayed).
        likely_excess_s = max(0.0, forecast.likely_s - self.target_s)
        retry_after_s = self._pace(path, prompt_tokens, likely_excess_s, waited_s + forecast.likely_s - self.target_s,
                                   takes_place=retry_count is not None)
        raise Overloaded(f"the {path.value} pool would make this request wait ~{total_s:.1f}s, {waited_s:.1f}s "
                         f"of it in the router already (admission target {self.target_s:g}s)",
                         retry_after_s=retry_after_s)

    def _pace(self, path: ServePath, prompt_tokens: int, excess_s: float, backlog_excess_s: float,
              takes_place: bool) -> float:
        """Seconds until this refused client's place in the queue of refused clients (module docstring): not
        before its backlog's `excess_s`, and after the prompts of those told to come back before it, each
        weighted by the share of refused clients that come back. `takes_place` False: told the same, but the
        queue does not grow by it.

        The queue starts behind the backlog as `backlog_excess_s` has it, the time the request spent in the
        router included: one client coming back waits in the router's queue while the pool drains, but
        refused clients coming back together are much of that queue themselves, and it does not drain while
        they wait in it. Measured at 4x overload with clients retrying as openai-python does, three runs each:
        with the queue started from the pool's excess alone, 93-96% of clients served, admitted TTFT p90
        1.51-2.46 s; with the router's queue in the queue's start and in each client's own excess, 97-98%,
        1.00-2.02 s; as here, 95-97%, 1.32-2.27 s. The runs vary as much as the variants differ; the router's
        queue stays out of each client's own excess for the clients that come back alone (module docstring)."""
        now = self._clock()
        share = self.returns.share()
        paced = self._paced(path, share)
        # the clients the other routers refused are in the same queue outside: this one comes after them too
        queue_end = paced + self._dispatch.others_paced_s(POOL_ROLE[path])
        back_at = max(now + excess_s, queue_end)
        recent = self._recent_excess[path]
        recent.append(max(0.0, backlog_excess_s))
        rate = self._pool_rate(path)  # measured: a refusal comes from a forecast, which needs one
        if takes_place and rate and back_at - now <= HONOURED_RETRY_AFTER_S:
            # The queue ends after this client's prompt, if it comes back (as a share of clients do): behind
            # the backlog, whose end is the latest refusals' typical excess, not this one's. A forecast is now
            # and then far off (clumped completions, a stalled moment): the client it refused is told it, the
            # clients after it are not held back by it.
            backlog_end = now + median(recent)
            self._set_paced(path, paced + share * (max(0.0, backlog_end - queue_end) + prompt_tokens / rate))
            self.returns.handed_out(back_at)
        return back_at - now

    def _jumped_ahead(self, path: ServePath, prompt_tokens: int) -> None:
        """A first arrival admitted while refused clients wait: their places move back by its prompt (weighted
        as theirs are: with fewer of them coming back, fewer are waiting). Called on every admission, so the
        rate is measured only when someone is waiting."""
        share = self.returns.share()
        paced_until = self._paced(path, share)
        if paced_until <= self._clock():
            return
        if rate := self._pool_rate(path):
            self._set_paced(path, paced_until + share * prompt_tokens / rate)

    def _paced(self, path: ServePath, share: float) -> float:
        """When the clients refused so far on `path` will have had their places, at the return share `share`:
        the part still ahead was counted at the share of its time, and is rescaled to this one (clients
        found not to come back take their places with them at once)."""
        now = self._clock()
        until = self._paced_until.get(path, now)
        counted_at = self._paced_share.get(path, share)
        if until > now and counted_at != share:
            until = now + (until - now) * share / counted_at
            self._set_paced(path, until)
        self._paced_share[path] = share
        return max(until, now)

    def _set_paced(self, path: ServePath, until: float) -> None:
        """Move the end of this router's refused clients' places on `path`, and tell the other routers (their
        refused clients queue behind these: router/dispatch.py publishes it)."""
        self._paced_until[path] = until
        self._dispatch.publish_paced(POOL_ROLE[path], until - self._clock())

    def retry_queue_s(self, path: ServePath) -> float:
        """Seconds until the clients refused so far on `path` will have had their places (0: none waiting)."""
        return max(0.0, self._paced(path, self.returns.share()) - self._clock())
