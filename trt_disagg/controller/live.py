"""The controller against a live deployment: Redis in, decisions out, on a wall clock.

    every interval_s:
        shape      ← role sets (live, not drained instances)             registry_read
        observed   ← trtd:finished entries of the last window_s           (the routers write them)
        decision   ← Controller.decide(now, shape, observed, busy)        pure
        enact      ← Actuator.apply (not in dry-run)
        record     ← trtd:autoscale:decisions (JSON with the reason) + metrics

Losing Redis never stops the deployment: the controller logs, waits (backing off, doubling up to
`max_backoff_s`) and tries again; instances and routers go on serving with the shape they have. An actuator
that fails to enact a change (an instance that does not start in its new role) is logged and recorded as
failed with the reason, whether `apply` raised or the change failed later (`ReportsOutcomes`); the
controller then backs off, doubling with each failure in a row, before it changes anything again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from trt_disagg.contract import Role
from trt_disagg.controller.actuator import Actuator, ReportsOutcomes
from trt_disagg.controller.observe import FinishedRequest, ObservedWorkload
from trt_disagg.controller.policy import Action, Controller, Decision, Shape
from trt_disagg.keys import DECISIONS_MAXLEN, as_text, autoscale_decisions_key, drain_key, finished_key
from trt_disagg.registry_read import list_instances

log = logging.getLogger(__name__)

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


async def read_finished(redis: Any, since_s: float) -> list[FinishedRequest]:
    """Finished-request summaries written since `since_s` (unix seconds; the stream ids are their times)."""
    entries = await redis.xrange(finished_key(), min=f"{int(since_s * 1000)}-0", max="+")
    return [FinishedRequest.from_stream_fields({as_text(k): as_text(v) for k, v in fields.items()})
            for _, fields in entries]


async def read_shape(redis: Any) -> Shape:
    """Prefill and decode instances that are registered and not drained."""
    counts = {}
    for role in (Role.PREFILL, Role.DECODE):
        live = await list_instances(redis, role)
        drained = [await redis.exists(drain_key(i.instance_id)) for i in live]
        counts[role] = sum(1 for d in drained if not d)
    return Shape(counts[Role.PREFILL], counts[Role.DECODE])


async def record_decision(redis: Any, decision: Decision) -> None:
    await redis.xadd(autoscale_decisions_key(), {"d": json.dumps(decision.to_json())}, maxlen=DECISIONS_MAXLEN,
                     approximate=True)


@dataclass(frozen=True)
class LoopSettings:
    max_backoff_s: float = 60.0
    dry_run: bool = False


class ControllerLoop:
    """One controller, one Redis, one actuator; `step` is one interval (what a test or `--once` calls)."""

    def __init__(self, redis: Any, controller: Controller, actuator: Actuator, settings: LoopSettings,
                 clock: Callable[[], float] = time.time, on_decision: Callable[[Decision], None] | None = None) -> None:
        self.redis = redis
        self.controller = controller
        self.actuator = actuator
        self.settings = settings
        self.clock = clock
        self.on_decision = on_decision

    async def step(self) -> Decision:
        now = self.clock()
        cfg = self.controller.config
        shape = await read_shape(self.redis)
        await self._record_outcomes(now, shape)
        observed = ObservedWorkload.from_finished(await read_finished(self.redis, now - cfg.window_s), cfg.window_s,
                                                  self._slo()[0], self._slo()[1])
        decision = self.controller.decide(now, shape, observed, busy=self.actuator.busy(now))
        if decision.action is not Action.NONE and not self.settings.dry_run:
            try:
                self.actuator.apply(decision.action, now)
            except Exception as exc:  # the deployment keeps its shape; recorded, retried after a back-off
                decision = self._failed(decision, shape, now, str(exc))
        await self._emit(decision)
        return decision

    async def _emit(self, decision: Decision) -> None:
        await record_decision(self.redis, decision)
        if self.on_decision is not None:
            self.on_decision(decision)

    def _failed(self, decision: Decision, shape: Shape, now: float, why: str) -> Decision:
        """The record of a change that could not be enacted; the controller backs off before the next."""
        wait_s = self.controller.note_failure(now)
        log.error("autoscaler: %s failed: %s; the deployment keeps serving as %s; no change for %.0f s",
                  decision.action, why, shape, wait_s)
        return Decision(now, shape, Action.NONE, f"{decision.action} failed: {why}; next try in {wait_s:.0f} s",
                        decision.predicted_before, None, decision.target_shape, decision.observed,
                        failed=decision.action)

    async def _record_outcomes(self, now: float, shape: Shape) -> None:
        """Changes that ended since the last interval: a failure is recorded and backs off, a success resets."""
        if not isinstance(self.actuator, ReportsOutcomes):
            return
        for outcome in self.actuator.take_outcomes():
            if outcome.ok:
                self.controller.note_success()
                continue
            started = Decision(outcome.started_s, shape, outcome.action, "", None, None, None)
            await self._emit(self._failed(started, shape, now, outcome.detail))

    def _slo(self) -> tuple[float, float]:
        slo = getattr(self.controller.predictor, "slo", None)
        return (slo.ttft_s, slo.tpot_s) if slo is not None else (float("inf"), float("inf"))

    async def run(self, stop: asyncio.Event) -> None:
        """`step` every interval until `stop`; Redis errors back off (doubling) instead of ending the loop."""
        backoff_s = self.controller.config.interval_s
        while not stop.is_set():
            wait_s = self.controller.config.interval_s
            try:
                await self.step()
                backoff_s = self.controller.config.interval_s
            except REDIS_ERRORS as exc:
                backoff_s = min(self.settings.max_backoff_s, backoff_s * 2)
                wait_s = backoff_s
                log.warning("autoscaler: Redis unreachable (%s); the deployment keeps its shape; retrying in %.0f s",
                            exc, wait_s)
            try:
                await asyncio.wait_for(stop.wait(), wait_s)
            except TimeoutError:
                pass
