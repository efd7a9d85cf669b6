"""Keeping a deployment up after start-up: what `trt-disagg serve` does when one of its processes dies.

    tick() (every ~0.5 s):
      embedded Redis down ─▶ restart it, empty, on the same port: instances re-register with their next
                             heartbeat, the router's client reconnects by itself
      router down         ─▶ restart it on the same port
      instance down       ─▶ clean up its process group and shm, relaunch it on the same ports; its
                             in-flight work has already failed over through the router
      each restart waits a back-off that doubles with every failure in a row; a process that failed
      `max_restarts` times in a row is given up, and when that leaves a role with no instance (or the
      deployment without its Redis or router) tick() raises DeploymentFailed.

The set of processes is re-read every tick (`supervised()`): an instance the autoscaler added is watched
once it is ready, and one it retires on purpose drops out before it is stopped, so it is never "restarted".

A failure counts as "in a row" until the restarted process has stayed up for `stable_s`: a crash loop costs
little, while a rare crash is repaired after `backoff_s`. Only processes this host started are touched: an
external Redis (REDIS_URL) is not ours to restart; the instances re-register in it when it comes back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from trt_disagg.contract import Role
from trt_disagg.errors import UserError

log = logging.getLogger(__name__)


class Supervised(Protocol):
    """What the supervisor needs from a deployment (triton.cluster.LocalCluster; a fake in unit tests)."""

    def supervised(self) -> dict[str, Role | None]: ...  # name -> role served (None: Redis, router)
    def why_down(self, name: str) -> str | None: ...  # None while it runs
    def restart(self, name: str) -> None: ...  # relaunch; returns without waiting for readiness


class DeploymentFailed(Exception):
    """The deployment cannot serve any more and no restart will fix it; the message says what is gone."""


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5  # failures in a row before a process is given up
    backoff_s: float = 1.0  # wait before the first restart; doubles with each failure in a row
    max_backoff_s: float = 30.0
    stable_s: float = 60.0  # up this long: the failures before no longer count

    def delay_s(self, num_failures: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, num_failures - 1))


@dataclass(frozen=True)
class Restart:
    """One restart, as logged: which process, why it was down, after how many failures in a row."""

    name: str
    reason: str
    attempt: int
    at: float


@dataclass
class _Watch:
    """Restart bookkeeping of one supervised process."""

    name: str
    role: Role | None
    up_since: float
    failures: int = 0  # in a row; reset after stable_s up
    restart_at: float | None = None  # set while down: when the relaunch is due
    reason: str = ""
    given_up: bool = False


@dataclass
class Supervisor:
    cluster: Supervised
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    clock: Callable[[], float] = time.monotonic
    restarts: list[Restart] = field(default_factory=list)

    def __post_init__(self) -> None:
        now = self.clock()
        self._watches = {name: _Watch(name, role, now) for name, role in self.cluster.supervised().items()}

    def tick(self) -> None:
        """Check every process once; restart what is due; raise DeploymentFailed when nothing can help."""
        now = self.clock()
        self._sync(now)
        for w in self._watches.values():
            if not w.given_up:
                self._check(w, now)
        self._check_enough_left()

    def _sync(self, now: float) -> None:
        """Watch what the deployment owns now: added instances in, retired ones out."""
        current = self.cluster.supervised()
        for name in [n for n in self._watches if n not in current]:
            del self._watches[name]
        for name, role in current.items():
            if name not in self._watches:
                self._watches[name] = _Watch(name, role, now)

    def _check(self, w: _Watch, now: float) -> None:
        reason = self.cluster.why_down(w.name)
        if reason is None:
            if w.failures and now - w.up_since >= self.policy.stable_s:
                w.failures = 0
            return
        if w.restart_at is None:  # just found down
            w.failures += 1
            w.reason = reason
            if w.failures > self.policy.max_restarts:
                w.given_up = True
                log.error("%s is down (%s) after %d restarts in a row: giving it up", w.name, reason,
                          self.policy.max_restarts)
                return
            delay = self.policy.delay_s(w.failures)
            w.restart_at = now + delay
            log.warning("%s is down (%s): restarting it in %.1fs (attempt %d of %d)", w.name, reason, delay,
                        w.failures, self.policy.max_restarts)
            return
        if now < w.restart_at:
            return
        w.restart_at, w.up_since = None, now
        self.restarts.append(Restart(w.name, w.reason, w.failures, now))
        try:
            self.cluster.restart(w.name)
        except UserError as exc:  # e.g. Redis's port taken meanwhile: counted as the next failure
            log.error("restarting %s failed: %s", w.name, exc)
            return
        log.warning("restarted %s (it was down: %s)", w.name, w.reason)

    def _check_enough_left(self) -> None:
        lost = [w for w in self._watches.values() if w.given_up and w.role is None]
        if lost:
            raise DeploymentFailed(f"{lost[0].name} keeps failing ({lost[0].reason}); gave up after "
                                   f"{self.policy.max_restarts} restarts in a row")
        roles = {w.role for w in self._watches.values() if w.role is not None}
        for role in sorted(roles, key=lambda r: r.value):
            mine = [w for w in self._watches.values() if w.role is role]
            if all(w.given_up for w in mine):
                raise DeploymentFailed(
                    f"no {role.value} instance left: {', '.join(w.name for w in mine)} failed "
                    f"{self.policy.max_restarts} restarts in a row (last: {mine[-1].reason})")
