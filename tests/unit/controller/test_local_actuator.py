"""LocalClusterActuator on a fake cluster: (1) an added instance keeps the actuator busy until it is ready,
(2) a removal drains then stops the newest instance, (3) a role switch retires one role before starting the
other, (4) a start that fails is discarded and reported, and the live loop records it as failed and backs
off for longer after each failure in a row, (5) the last instance of a role is never retired."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.unit.controller.test_policy import CapacityPredictor
from tests.unit.router.router_testkit import redis, register, valkey_url  # noqa: F401  (pytest fixtures)
from trt_disagg.contract import Role
from trt_disagg.controller.live import ControllerLoop, LoopSettings
from trt_disagg.controller.local_actuator import ActuatorSettings, LocalClusterActuator
from trt_disagg.controller.policy import Action, Budget, Controller, ControllerConfig, Shape
from trt_disagg.errors import UserError
from trt_disagg.keys import autoscale_decisions_key, finished_key
from trt_disagg.triton.retire import DrainResult

DEADLINE_S = 5.0


class FakeCluster:
    """Instances by id; readiness is released by the test; every call is logged in order."""

    def __init__(self, num_prefill: int = 1, num_decode: int = 2) -> None:
        self.roles = {f"prefill-{i}": Role.PREFILL for i in range(num_prefill)}
        self.roles |= {f"decode-{i}": Role.DECODE for i in range(num_decode)}
        self.next_index = {Role.PREFILL: num_prefill, Role.DECODE: num_decode}
        self.calls: list[str] = []
        self.ready = threading.Event()
        self.fail_start: str | None = None  # wait_instance_ready raises this
        self.starting: set[str] = set()

    def serving(self, role: Role) -> list[str]:
        return sorted(i for i, r in self.roles.items() if r is role and i not in self.starting)

    def add_instance(self, role: Role) -> str:
        iid = f"{role.value}-{self.next_index[role]}"
        self.next_index[role] += 1
        self.roles[iid] = role
        self.starting.add(iid)
        self.calls.append(f"add {iid}")
        return iid

    def wait_instance_ready(self, instance_id: str, timeout_s: float, abort: threading.Event | None = None) -> None:
        if self.fail_start is not None:
            raise UserError(self.fail_start)
        if not self.ready.wait(timeout_s):
            raise UserError(f"{instance_id} not ready after {timeout_s:.0f}s")
        self.starting.discard(instance_id)
        self.calls.append(f"ready {instance_id}")

    def discard_instance(self, instance_id: str) -> None:
        self.calls.append(f"discard {instance_id}")
        del self.roles[instance_id]
        self.starting.discard(instance_id)

    def retire_instance(self, instance_id: str, drain_timeout_s: float,
                        abort: threading.Event | None = None) -> DrainResult:
        self.calls.append(f"retire {instance_id} within {drain_timeout_s:g}s")
        del self.roles[instance_id]
        return DrainResult(True, 0.5, "")


def wait_idle(actuator: LocalClusterActuator) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while actuator.busy(0.0):
        assert time.monotonic() < deadline, "the change did not end"
        time.sleep(0.01)  # polling the worker thread


SETTINGS = ActuatorSettings(drain_timeout_s=7.0, startup_timeout_s=DEADLINE_S)


def test_an_added_instance_keeps_the_actuator_busy_until_ready():
    cluster = FakeCluster()
    act = LocalClusterActuator(cluster, SETTINGS)
    act.apply(Action.ADD_DECODE, 0.0)
    assert act.busy(0.0) and act.shape() == Shape(1, 3)  # (1) the shape it is becoming
    assert cluster.calls == ["add decode-2"] and act.take_outcomes() == []
    with pytest.raises(UserError, match="one change at a time"):
        act.apply(Action.ADD_PREFILL, 0.0)
    cluster.ready.set()  # (2) its model is ready
    wait_idle(act)
    (outcome,) = act.take_outcomes()
    assert outcome.ok and "started decode-2" in outcome.detail
    assert cluster.calls == ["add decode-2", "ready decode-2"] and act.shape() == Shape(1, 3)


def test_a_removal_drains_then_stops_the_newest_instance():
    cluster = FakeCluster(num_decode=3)
    act = LocalClusterActuator(cluster, SETTINGS)
    act.apply(Action.REMOVE_DECODE, 0.0)
    wait_idle(act)
    assert cluster.calls == ["retire decode-2 within 7s"]
    (outcome,) = act.take_outcomes()
    assert outcome.ok and "drained in 0.5 s" in outcome.detail and act.shape() == Shape(1, 2)


def test_a_role_switch_retires_the_old_role_before_starting_the_new():
    cluster = FakeCluster()
    cluster.ready.set()
    act = LocalClusterActuator(cluster, SETTINGS)
    act.apply(Action.DECODE_TO_PREFILL, 0.0)
    wait_idle(act)
    assert cluster.calls == ["retire decode-1 within 7s", "add prefill-1", "ready prefill-1"]
    assert act.shape() == Shape(2, 1) and act.take_outcomes()[0].ok


def test_the_last_instance_of_a_role_is_never_retired():
    cluster = FakeCluster(num_prefill=1, num_decode=1)
    act = LocalClusterActuator(cluster, SETTINGS)
    for action in (Action.REMOVE_PREFILL, Action.PREFILL_TO_DECODE, Action.DECODE_TO_PREFILL):
        with pytest.raises(UserError, match="minimum is 1"):
            act.apply(action, 0.0)
    at_two = LocalClusterActuator(FakeCluster(num_decode=2), ActuatorSettings(min_decode=2))
    with pytest.raises(UserError, match="minimum is 2"):
        at_two.apply(Action.REMOVE_DECODE, 0.0)
    assert cluster.calls == [] and not act.busy(0.0)


def test_a_failed_start_is_discarded_and_reported():
    cluster = FakeCluster()
    cluster.fail_start = "instance prefill-1 exited during start-up (exit code 1)"
    act = LocalClusterActuator(cluster, SETTINGS)
    act.apply(Action.DECODE_TO_PREFILL, 0.0)
    wait_idle(act)
    assert cluster.calls == ["retire decode-1 within 7s", "add prefill-1", "discard prefill-1"]
    (outcome,) = act.take_outcomes()
    assert not outcome.ok and "prefill-1 did not start as prefill: instance prefill-1 exited" in outcome.detail
    assert act.shape() == Shape(1, 1)  # serving on with what it has


async def test_the_loop_records_a_failed_change_and_backs_off_longer_each_time(redis):  # noqa: F811
    for iid, role in (("prefill-0", Role.PREFILL), ("decode-0", Role.DECODE), ("decode-1", Role.DECODE)):
        await register(redis, iid, role)
    now = time.time()
    for _ in range(40):  # 40 requests in the 1000 s window: 0.04 req/s
        await redis.xadd(finished_key(), {"s": "DONE", "t0": now - 1, "t1": now - 0.5, "t2": now, "p": 100, "o": 10})
    clock = Clock(now)
    config = ControllerConfig(interval_s=10.0, cooldown_s=10.0, window_s=1000.0, min_requests=10)
    controller = Controller(config, Budget(3), CapacityPredictor(50.0, 25.0))  # wants 2P1D
    cluster = FakeCluster()
    cluster.fail_start = "engine for prefill missing"
    act = LocalClusterActuator(cluster, SETTINGS, clock=clock)
    loop = ControllerLoop(redis, controller, act, LoopSettings(), clock=clock)
    waits = []
    for _ in range(3):
        first = await loop.step()  # (1) the switch is started...
        assert first.action is Action.DECODE_TO_PREFILL, first.reason
        wait_idle(act)  # ...and fails in the worker
        await register(redis, "decode-1", Role.DECODE)  # the fake's retirement left the registry as it was
        cluster.roles["decode-1"] = Role.DECODE
        clock.now += 1.0
        held = await loop.step()  # (2) the failure is recorded; nothing changes during the back-off
        assert held.action is Action.NONE and "back-off: " in held.reason
        assert controller.retry_at_s is not None
        waits.append(controller.retry_at_s - clock.now)
        clock.now = controller.retry_at_s
    assert waits == [10.0, 20.0, 40.0]  # (3) doubling, never at once
    records = [json.loads(f[b"d"]) for _, f in await redis.xrange(autoscale_decisions_key())]
    failed = [r for r in records if r.get("failed")]
    assert len(failed) == 3 and failed[0]["failed"] == "decode_to_prefill"
    assert "engine for prefill missing" in failed[0]["reason"] and "next try in 10 s" in failed[0]["reason"]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
