"""The supervisor's decisions on a fake deployment and a fake clock: restart after a back-off that doubles,
forget old failures after a stable period, give a process up after N failures in a row, and stop the
deployment only when a role (or Redis, or the router) is gone for good."""

from __future__ import annotations

import pytest

from trt_disagg.contract import Role
from trt_disagg.errors import UserError
from trt_disagg.triton.supervise import DeploymentFailed, RestartPolicy, Supervisor

POLICY = RestartPolicy(max_restarts=3, backoff_s=1.0, max_backoff_s=4.0, stable_s=60.0)


class FakeDeployment:
    def __init__(self) -> None:
        self.roles: dict[str, Role | None] = {"redis": None, "router": None, "prefill-0": Role.PREFILL,
                                              "decode-0": Role.DECODE, "decode-1": Role.DECODE}
        self.down: dict[str, str] = {}
        self.restarted: list[str] = []
        self.failing_restarts: set[str] = set()  # restarting these raises, as a taken Redis port would

    def supervised(self) -> dict[str, Role | None]:
        return dict(self.roles)

    def why_down(self, name: str) -> str | None:
        return self.down.get(name)

    def restart(self, name: str) -> None:
        self.restarted.append(name)
        if name in self.failing_restarts:
            raise UserError("port taken")
        self.down.pop(name, None)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup() -> tuple[FakeDeployment, Clock, Supervisor]:
    dep, clock = FakeDeployment(), Clock()
    return dep, clock, Supervisor(dep, POLICY, clock)


def test_a_dead_instance_is_restarted_after_the_back_off(setup):
    dep, clock, sup = setup
    dep.down["decode-1"] = "killed by SIGKILL"
    sup.tick()  # (1) found down: restart scheduled in 1 s
    assert dep.restarted == []
    clock.now = 0.9
    sup.tick()
    assert dep.restarted == []
    clock.now = 1.0
    sup.tick()  # (2) due: restarted, with the reason recorded
    assert dep.restarted == ["decode-1"]
    assert [(r.name, r.reason, r.attempt) for r in sup.restarts] == [("decode-1", "killed by SIGKILL", 1)]


def test_back_off_doubles_in_a_row_and_resets_after_a_stable_period(setup):
    dep, clock, sup = setup
    delays = []
    for _ in range(3):
        dep.down["prefill-0"] = "exit code 1"
        sup.tick()
        found = clock.now
        while dep.why_down("prefill-0") is not None:
            clock.now += 0.5
            sup.tick()
        delays.append(clock.now - found)
    assert delays == [1.0, 2.0, 4.0]
    clock.now += POLICY.stable_s  # up long enough: the earlier failures no longer count
    sup.tick()
    dep.down["prefill-0"] = "exit code 1"
    sup.tick()
    assert sup.restarts[-1].attempt == 3
    clock.now += 1.0
    sup.tick()
    assert sup.restarts[-1].attempt == 1


def test_an_instance_given_up_leaves_the_deployment_up_while_its_role_has_another(setup):
    dep, clock, sup = setup
    dep.failing_restarts.add("decode-1")
    dep.down["decode-1"] = "exit code 1"
    for _ in range(40):
        clock.now += 1.0
        sup.tick()  # never raises: decode-0 still serves
    assert dep.restarted.count("decode-1") == POLICY.max_restarts


def test_a_role_without_instances_stops_the_deployment_with_the_reason(setup):
    dep, clock, sup = setup
    dep.failing_restarts.add("prefill-0")
    dep.down["prefill-0"] = "exit code 1"
    with pytest.raises(DeploymentFailed, match="no prefill instance left: prefill-0 failed 3 restarts"):
        for _ in range(40):
            clock.now += 1.0
            sup.tick()


def test_redis_that_keeps_failing_stops_the_deployment(setup):
    dep, clock, sup = setup
    dep.failing_restarts.add("redis")
    dep.down["redis"] = "the embedded Valkey exited"
    with pytest.raises(DeploymentFailed, match="redis keeps failing"):
        for _ in range(40):
            clock.now += 1.0
            sup.tick()


def test_added_instances_are_watched_and_retired_ones_never_restarted(setup):
    dep, clock, sup = setup
    dep.roles["decode-2"] = Role.DECODE  # (1) the autoscaler added one; ready: supervised from now on
    sup.tick()
    dep.down["decode-2"] = "killed by SIGKILL"
    sup.tick()
    clock.now = 1.0
    sup.tick()
    assert dep.restarted == ["decode-2"]
    del dep.roles["decode-1"]  # (2) retired on purpose: out of supervision before its stop
    dep.down["decode-1"] = "exit code 0"
    for t in (2.0, 10.0, 60.0):
        clock.now = t
        sup.tick()
    assert dep.restarted == ["decode-2"]
