"""SLO-aware admission: refuse (429) a request that would wait longer than its target, with a Retry-After
computed from the queue, instead of admitting work that cannot be served in time.

    estimated wait = (prompt tokens queued on the pool + this prompt) / the pool's prefill rate
    prefill rate   = the larger of two measured lower bounds of its capacity: the prompt tokens the pool
                     finished per second between its first and last completion of the last window_s (exact
                     while it is saturated), and the tokens per second of its recent prefill calls, queueing
                     included (exact while it is not)
    refuse when the estimated wait > target (request_timeout_s, or the TTFT SLO with admission_target=ttft);
    Retry-After    = the time the queue needs to drain until the wait meets the target again (whole seconds;
                     `retry-after-ms` has it to the millisecond)

The queue is the larger of what the instances published and what the routers have outstanding there
(dispatch.Candidate), the same figure dispatch balances on. The rate is measured, not modelled: it follows
the engine as served on this machine, whatever its load. With no prefill finished in the window there is no
evidence of a queue that does not move, and everything is admitted.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from router.dispatch import Dispatcher, ServePath
from router.errors import Overloaded
from trt_disagg.contract import Role

POOL_ROLE = {ServePath.DISAGGREGATED: Role.PREFILL, ServePath.COLOCATED: Role.COLOCATED}


class Admission:
    def __init__(self, dispatcher: Dispatcher, *, target_s: float, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._dispatch = dispatcher
        self._clock = clock
        self.target_s = target_s
        self._window_s = window_s
        self._done: dict[ServePath, deque[tuple[float, int, float]]] = {p: deque() for p in ServePath}

    def prefilled(self, path: ServePath, prompt_tokens: int, duration_s: float) -> None:
        """A prefill of `prompt_tokens` finished on `path`'s pool (its first token came back) after
        `duration_s` from the call."""
        self._done[path].append((self._clock(), prompt_tokens, duration_s))
        self._expire(path)

    def rate_tokens_per_s(self, path: ServePath) -> float | None:
        done = self._expire(path)
        if not done:
            return None
        per_call = sum(tokens for _, tokens, _ in done) / max(1e-6, sum(d for _, _, d in done))
        if len(done) < 2:
            return per_call
        # what the pool served between its first and last completion in the window: idle time before a
        # burst would otherwise dilute the rate and inflate every wait (and Retry-After) it is used for
        span_s = done[-1][0] - done[0][0]
        served = sum(tokens for _, tokens, _ in list(done)[1:]) / max(span_s, 1e-6)
        return max(served, per_call)

    def _expire(self, path: ServePath) -> deque[tuple[float, int, float]]:
        done, oldest_s = self._done[path], self._clock() - self._window_s
        while done and done[0][0] < oldest_s:
            done.popleft()
        return done

    def estimated_wait_s(self, path: ServePath, prompt_tokens: int) -> float | None:
        rate = self.rate_tokens_per_s(path)
        if rate is None:
            return None
        queued = sum(c.queued_prompt_tokens for c in self._dispatch.candidates(POOL_ROLE[path]))
        return (queued + prompt_tokens) / rate

    def check(self, path: ServePath, prompt_tokens: int) -> None:
        """Raise Overloaded (429 + Retry-After) when this request would wait longer than the target. A LOCAL
        request prefills a short suffix on the instance holding its prefix: no prefill queue to wait in."""
        if path not in POOL_ROLE:
            return
        wait_s = self.estimated_wait_s(path, prompt_tokens)
        if wait_s is None or wait_s <= self.target_s:
            return
        retry_after_s = wait_s - self.target_s
        raise Overloaded(f"the {path.value} pool would make this request wait ~{wait_s:.1f}s (admission "
                         f"target {self.target_s:g}s)", retry_after_s=retry_after_s)
