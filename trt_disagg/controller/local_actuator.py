"""`LocalClusterActuator`: the controller's decisions enacted on `trt-disagg serve`'s own processes.

    ADD_<role>             start a new instance of the role ─▶ wait until its model is ready (it registers
                           itself then, and only then takes work)
    REMOVE_<role>          retire one instance: drain ─▶ wait until idle (bounded) ─▶ deregister ─▶ stop
    <old>_TO_<new>         retire one <old> instance, then start one <new> instance (that role's engine):
                           the instance count never rises to rebalance, so the budget holds throughout

One change at a time, in a worker thread: `apply` returns once it has started, `busy` is true until it has
ended, and `take_outcomes` reports how it ended (the live loop records a failure and backs off). A start
that fails is stopped and forgotten, with its reason (and log tail) logged; the deployment serves on with
what it has. Never below a role's minimum: the last instance of a role is never retired, whatever asked.
The instance retired is the newest of its role: its prefix cache is the coldest, so the least is lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from trt_disagg.contract import Role
from trt_disagg.controller.actuator import ChangeOutcome
from trt_disagg.controller.policy import Action, Shape, apply_action
from trt_disagg.errors import UserError
from trt_disagg.triton.retire import DrainResult

log = logging.getLogger(__name__)

# What each action does: the role retired first (or None), then the role started (or None).
STEPS: dict[Action, tuple[Role | None, Role | None]] = {
    Action.ADD_PREFILL: (None, Role.PREFILL), Action.ADD_DECODE: (None, Role.DECODE),
    Action.REMOVE_PREFILL: (Role.PREFILL, None), Action.REMOVE_DECODE: (Role.DECODE, None),
    Action.PREFILL_TO_DECODE: (Role.PREFILL, Role.DECODE), Action.DECODE_TO_PREFILL: (Role.DECODE, Role.PREFILL)}


class ScalableCluster(Protocol):
    """What the actuator needs of the deployment (triton.cluster.LocalCluster; a fake in unit tests)."""

    def serving(self, role: Role) -> list[str]: ...  # up, supervised instance ids of `role`
    def add_instance(self, role: Role) -> str: ...  # launched; returns its id at once
    def wait_instance_ready(self, instance_id: str, timeout_s: float,
                            abort: threading.Event | None = None) -> None: ...  # UserError if it never is
    def discard_instance(self, instance_id: str) -> None: ...  # stop and forget one that never got ready
    def retire_instance(self, instance_id: str, drain_timeout_s: float,
                        abort: threading.Event | None = None) -> DrainResult: ...


@dataclass(frozen=True)
class ActuatorSettings:
    drain_timeout_s: float = 60.0  # then in-flight work fails over through the router
    startup_timeout_s: float = 300.0  # an instance not ready by then has failed to start
    min_prefill: int = 1
    min_decode: int = 1

    def minimum(self, role: Role) -> int:
        return max(1, self.min_prefill if role is Role.PREFILL else self.min_decode)


class LocalClusterActuator:
    """Enacts one change at a time on a `ScalableCluster`, each in its own worker thread."""

    def __init__(self, cluster: ScalableCluster, settings: ActuatorSettings,
                 clock: Callable[[], float] = time.time) -> None:
        self.cluster = cluster
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._target: Shape | None = None  # the shape the change in progress leads to
        self._outcomes: list[ChangeOutcome] = []
        self._abort = threading.Event()

    def shape(self) -> Shape:
        with self._lock:
            if self._target is not None:
                return self._target
        return Shape(len(self.cluster.serving(Role.PREFILL)), len(self.cluster.serving(Role.DECODE)))

    def busy(self, now_s: float) -> bool:
        with self._lock:
            return self._worker is not None and self._worker.is_alive()

    def apply(self, action: Action, now_s: float) -> None:
        """Start `action` in a worker thread; UserError (nothing started) for a change that may not be made."""
        if action not in STEPS:
            raise ValueError(f"not an action to enact: {action}")
        if self.busy(now_s):
            raise UserError(f"{action}: the previous change is still in progress (one change at a time)")
        if self._abort.is_set():
            raise UserError(f"{action}: the actuator is stopping")
        old_role, _ = STEPS[action]
        if old_role is not None:
            serving = self.cluster.serving(old_role)
            if len(serving) <= self.settings.minimum(old_role):
                raise UserError(f"{action}: {len(serving)} {old_role.value} instance(s) serving, the minimum is "
                                f"{self.settings.minimum(old_role)}: not retiring one")
        target = apply_action(self.shape(), action)
        worker = threading.Thread(target=self._run, args=(action, now_s), name=f"autoscale-{action.value}",
                                  daemon=True)
        with self._lock:
            self._target, self._worker = target, worker
        worker.start()

    def take_outcomes(self) -> list[ChangeOutcome]:
        with self._lock:
            out, self._outcomes = self._outcomes, []
        return out

    def close(self, timeout_s: float = 60.0) -> None:
        """Abandon a change in progress (its waits end at once) and wait for the worker; before the cluster
        stops, so that nothing is started or retired behind the clean-up's back."""
        self._abort.set()
        with self._lock:
            worker = self._worker
        if worker is not None:
            worker.join(timeout_s)

    def _run(self, action: Action, started_s: float) -> None:
        try:
            ok, detail = True, self._enact(action)
            log.warning("autoscaler: %s done: %s", action, detail)
        except Exception as exc:  # reported as the outcome: the controller records it and backs off
            ok, detail = False, str(exc)
            log.error("autoscaler: %s failed: %s", action, exc)
        with self._lock:
            self._outcomes.append(ChangeOutcome(action, ok, detail, started_s, self.clock()))
            self._target = None

    def _enact(self, action: Action) -> str:
        old_role, new_role = STEPS[action]
        done = []
        if old_role is not None:
            done.append(self._retire(old_role))
        if new_role is not None:
            if self._abort.is_set():
                raise UserError(f"stopping: no {new_role.value} instance started")
            done.append(self._start(new_role))
        return "; ".join(done)

    def _retire(self, role: Role) -> str:
        serving = self.cluster.serving(role)
        if len(serving) <= self.settings.minimum(role):  # checked again: an instance may have died meanwhile
            raise UserError(f"only {len(serving)} {role.value} instance(s) serving: not retiring one")
        victim = max(serving, key=_index)
        result = self.cluster.retire_instance(victim, self.settings.drain_timeout_s, self._abort)
        how = (f"drained in {result.waited_s:.1f} s" if result.idle
               else f"drain deadline after {result.waited_s:.0f} s (failed over: {result.in_flight})")
        return f"retired {victim} ({how})"

    def _start(self, role: Role) -> str:
        t0 = time.monotonic()
        instance_id = self.cluster.add_instance(role)
        try:
            self.cluster.wait_instance_ready(instance_id, self.settings.startup_timeout_s, self._abort)
        except Exception as exc:
            self.cluster.discard_instance(instance_id)
            raise UserError(f"{instance_id} did not start as {role.value}: {exc}") from None
        return f"started {instance_id} (ready in {time.monotonic() - t0:.1f} s)"


def _index(instance_id: str) -> int:
    """The <n> of <role>-<n>: the newest instance has the highest."""
    return int(instance_id.rpartition("-")[2])
