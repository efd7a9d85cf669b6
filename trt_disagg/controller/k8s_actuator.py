"""KubernetesActuator: the controller's decisions as replica counts of the prefill and decode StatefulSets.

    ADD_<role>     kubectl scale statefulset/<sts> --replicas=n+1 --current-replicas=n
                   busy until instance "<role>-n" (the new pod's ordinal) is registered in Redis, not drained;
                   past startup_s: scaled back to n, failure reported (the deployment keeps its shape)
    REMOVE_<role>  drain mark on "<role>-(n-1)" (a StatefulSet removes its highest ordinal first), busy until
                   its load shows nothing in flight for settle_s (at most drain_s), then scale to n-1; busy
                   until its registration is gone (at most gone_s), then clear the drain mark
    X_TO_Y         REMOVE_X, then ADD_Y

A role switch is a removal and an addition, not a restart in place: on Kubernetes each role is its own
StatefulSet (its own pod template, GPUs and command), so an instance cannot change pool; the freed GPUs go
back to the cluster's scheduler, which places the new pod. If the addition fails, the removed instance is
added back, so a failed switch leaves the shape it started from.

Names come from trt_disagg.k8s.manifests (the same helpers `render --k8s` uses), and the instance id a new pod
registers under is `manifests.instance_id(role, ordinal)`; tests/unit/k8s/test_autoscaler_contract.py checks
both against the rendered objects. Deployments pinned to nodes (one StatefulSet per instance) are refused:
their replica counts cannot grow a role.

`apply` reads the replica counts afresh (an operator may have scaled by hand) and returns after the first
kubectl call; `busy(now)` advances the change (a Redis read or two, and the next kubectl call when a phase
ends), so whoever polls it sets the pace; how a change ended is reported through `take_outcomes`
(ReportsOutcomes: the live loop records a failure and backs off). kubectl calls are retried with back-off;
`--current-replicas` makes a retry of a scale that did go through fail its precondition instead of scaling
twice, and the actuator then reads the replicas to tell the two apart. No role is ever scaled below one, nor
past the instances the deployed ConfigMap lists (a pod beyond them would not find its instance).
"""

from __future__ import annotations

import enum
import json
import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from trt_disagg.config import Deployment, parse_deployment
from trt_disagg.contract import Role
from trt_disagg.controller.actuator import ChangeOutcome
from trt_disagg.controller.policy import Action, Shape, apply_action
from trt_disagg.errors import UserError
from trt_disagg.k8s.manifests import SCALABLE_ROLES, instance_id, object_names, scalable
from trt_disagg.keys import drain_key, instance_key, role_set_key
from trt_disagg.triton.retire import in_flight

log = logging.getLogger(__name__)

Runner = Callable[[list[str]], subprocess.CompletedProcess[str]]
KUBECTL_TIMEOUT_S = 60.0


class KubectlError(Exception):
    """kubectl failed (after its retries); the message says which call and what kubectl printed."""


def run_subprocess(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """The default runner: kubectl as a child process, its output captured (never on the controller's tty)."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=KUBECTL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", f"timed out after {KUBECTL_TIMEOUT_S:.0f}s")
    except FileNotFoundError:
        raise UserError(f"kubectl not found: {argv[0]!r} (--kubectl PATH)") from None


@dataclass
class Kubectl:
    """The three kubectl calls the actuator makes, with retries. `runner` is what a test replaces."""

    path: str = "kubectl"
    namespace: str | None = None  # None: the kubectl context's namespace
    runner: Runner = run_subprocess
    attempts: int = 4
    backoff_s: float = 1.0  # doubled after each failed attempt
    sleep: Callable[[float], None] = time.sleep

    def get(self, kind: str, name: str) -> dict[str, Any]:
        out = self._run(["get", kind, name, "-o", "json"], f"get {kind}/{name}")
        try:
            obj = json.loads(out)
        except json.JSONDecodeError:
            raise KubectlError(f"kubectl get {kind}/{name}: not JSON: {out[:200]!r}") from None
        assert isinstance(obj, dict)
        return obj

    def replicas(self, statefulset: str) -> int:
        return int(self.get("statefulset", statefulset)["spec"]["replicas"])

    def scale(self, statefulset: str, replicas: int, current: int) -> None:
        """Scale from `current` to `replicas`; a precondition failure because an earlier attempt already
        went through counts as done, one because someone else changed the count raises."""
        if replicas < 1:
            raise UserError(f"refusing to scale statefulset/{statefulset} to {replicas}: a role keeps one instance")
        args = ["scale", f"statefulset/{statefulset}", f"--replicas={replicas}", f"--current-replicas={current}"]
        try:
            self._run(args, f"scale statefulset/{statefulset} {current} -> {replicas}")
        except KubectlError as exc:
            if "Expected replicas" not in str(exc):
                raise
            now = self.replicas(statefulset)
            if now != replicas:
                raise KubectlError(f"statefulset/{statefulset} has {now} replicas, not {current}: changed by "
                                   "someone else; not scaling") from None

    def _run(self, args: list[str], what: str) -> str:
        argv = [self.path, *args] + (["-n", self.namespace] if self.namespace else [])
        delay_s, why = self.backoff_s, ""
        for attempt in range(1, self.attempts + 1):
            done = self.runner(argv)
            if done.returncode == 0:
                return done.stdout
            why = (done.stderr or done.stdout).strip() or f"exit code {done.returncode}"
            if "Expected replicas" in why or "NotFound" in why or "Forbidden" in why:
                break  # retrying cannot change these answers
            if attempt < self.attempts:
                log.warning("kubectl %s failed (%s); retry %d/%d in %.0fs", what, why, attempt,
                            self.attempts - 1, delay_s)
                self.sleep(delay_s)
                delay_s *= 2
        raise KubectlError(f"kubectl {what}: {why}")


@dataclass(frozen=True)
class K8sTarget:
    """What the actuator acts on, named as `render --k8s` names it."""

    statefulsets: dict[Role, str]
    config_map: str

    @classmethod
    def for_deployment(cls, dep: Deployment) -> K8sTarget:
        groups = dep.groups()
        if not all(r in groups for r in SCALABLE_ROLES):
            raise UserError(f"{dep.name}: the autoscaler shapes prefill and decode; this deployment has "
                            f"{', '.join(r.value for r in groups)} (context_servers + generation_servers needed)")
        if not scalable(dep):
            raise UserError(f"{dep.name}: `nodes` pins instances to nodes, so `render --k8s` wrote one StatefulSet "
                            "per instance, whose replicas cannot grow a role; autoscale a deployment without "
                            "`nodes` (or change such a one by re-planning and re-rendering)")
        names = object_names(dep)
        return cls({r: names.role(r) for r in SCALABLE_ROLES}, names.config)


@dataclass(frozen=True)
class Timeouts:
    startup_s: float = 1200.0  # a new instance: pod scheduled, image pulled, engine loaded, registered
    drain_s: float = 300.0  # the router's default request_timeout_s: what is in flight then has failed anyway
    settle_s: float = 2.0  # idle this long (several heartbeats) before the pod goes: no dispatch was in the air
    gone_s: float = 120.0  # terminationGracePeriodSeconds (60) plus the registration TTL, with margin


class Phase(enum.Enum):
    STARTING = "starting"  # scaled up; waiting for the new instance to register
    DRAINING = "draining"  # drain mark set; waiting for its work to finish
    STOPPING = "stopping"  # scaled down; waiting for its registration to go


@dataclass
class Step:
    """One instance added or removed: the unit of a change."""

    role: Role
    add: bool
    phase: Phase | None = None
    instance: str = ""
    deadline_s: float = 0.0
    idle_since_s: float | None = None
    rollback: bool = False  # restoring after a failed switch: its own failure has nothing left to undo


@dataclass
class KubernetesActuator:
    """Enacts one Action at a time on two StatefulSets; see the module docstring. Build it with `connect`."""

    kubectl: Kubectl
    target: K8sTarget
    redis: Any  # a synchronous redis client (the controller polls `busy` between its own async steps)
    replicas: dict[Role, int]
    capacity: dict[Role, int]  # instances the ConfigMap lists: pods beyond cannot start
    timeouts: Timeouts = Timeouts()
    _outcomes: list[ChangeOutcome] = field(default_factory=list, init=False)
    _steps: list[Step] = field(default_factory=list, init=False)  # the change in progress, first step first
    _action: Action = field(default=Action.NONE, init=False)
    _started_s: float = field(default=0.0, init=False)
    _failure: str | None = field(default=None, init=False)  # why the change failed (its undo may still run)

    @classmethod
    def connect(cls, dep: Deployment, kubectl: Kubectl, redis: Any,
                timeouts: Timeouts = Timeouts()) -> KubernetesActuator:
        """Read the replica counts and the ConfigMap's capacity from the cluster."""
        target = K8sTarget.for_deployment(dep)
        replicas = {r: kubectl.replicas(sts) for r, sts in target.statefulsets.items()}
        where = f"configmap/{target.config_map}"
        try:
            text = kubectl.get("configmap", target.config_map)["data"]["deployment.yaml"]
        except KeyError:
            raise UserError(f"{where} has no deployment.yaml: not written by `render --k8s`?") from None
        pod_dep = parse_deployment(yaml.safe_load(text), where)
        groups = pod_dep.groups()
        capacity = {r: groups[r].num_instances if r in groups else 0 for r in SCALABLE_ROLES}
        return cls(kubectl, target, redis, replicas, capacity, timeouts)

    # ---- the Actuator protocol ---------------------------------------------------------------------------

    def shape(self) -> Shape:
        now = Shape(self.replicas[Role.PREFILL], self.replicas[Role.DECODE])
        for s in self._steps:  # replicas change when an addition starts, and when a drain has ended
            if s.phase is None or s.phase is Phase.DRAINING:
                now = apply_action(now, _one(s.role, s.add))
        return now

    def busy(self, now_s: float) -> bool:
        was_busy = bool(self._steps)
        while self._steps:
            step = self._steps[0]
            if step.phase is None and not self._try_start(step, now_s):
                continue
            if not self._advance(step, now_s):
                break
            self._steps.pop(0)
        if was_busy and not self._steps and self._failure is None:
            self._outcomes.append(ChangeOutcome(self._action, True, f"{self._action}: now {self.shape()}",
                                                self._started_s, now_s))
        return bool(self._steps)

    def take_outcomes(self) -> list[ChangeOutcome]:
        """How the changes ended since the last call (ReportsOutcomes: the live loop records failures)."""
        out, self._outcomes = self._outcomes, []
        return out

    def apply(self, action: Action, now_s: float) -> None:
        if self._steps:
            raise UserError(f"{self._action} is still taking effect")
        if action is Action.NONE:
            raise UserError("nothing to apply: Action.NONE")
        steps = _steps_for(action)
        # Read the counts afresh: an operator may have scaled by hand since (then --current-replicas would
        # refuse every change made from a stale count).
        self.replicas = {r: self.kubectl.replicas(sts) for r, sts in self.target.statefulsets.items()}
        after = apply_action(self.shape(), action)
        for role, n in ((Role.PREFILL, after.num_prefill), (Role.DECODE, after.num_decode)):
            if n < 1:
                raise UserError(f"{action}: refusing to scale {role.value} to {n}; a role keeps one instance")
            if n > self.capacity[role]:
                raise UserError(f"{action}: {instance_id(role, n - 1)} is not in configmap/"
                                f"{self.target.config_map} (it lists {self.capacity[role]} {role.value} "
                                "instances); re-render with a larger max_instances_per_role and apply the ConfigMap")
        self._action, self._started_s, self._failure = action, now_s, None
        self._start(steps[0], now_s)  # raises: nothing changed, the loop records the failure
        self._steps = steps

    def in_progress(self) -> str | None:
        """What is half done (for a controller stopped mid-change), or None."""
        phase = self._steps[0].phase if self._steps else None
        if phase is None:
            return None
        return f"{self._action} was taking effect ({self._steps[0].instance} {phase.value})"

    # ---- steps ---------------------------------------------------------------------------------------------

    def _start(self, step: Step, now_s: float) -> None:
        n = self.replicas[step.role]
        sts = self.target.statefulsets[step.role]
        if step.add:
            step.instance = instance_id(step.role, n)
            self.redis.delete(drain_key(step.instance))  # a mark left from an earlier life of this ordinal
            self.kubectl.scale(sts, n + 1, n)
            self.replicas[step.role] = n + 1
            step.phase, step.deadline_s = Phase.STARTING, now_s + self.timeouts.startup_s
        else:
            if n - 1 < 1:
                raise UserError(f"refusing to scale {step.role.value} to {n - 1}: a role keeps one instance")
            step.instance = instance_id(step.role, n - 1)
            self.redis.set(drain_key(step.instance), "1")
            step.phase, step.deadline_s = Phase.DRAINING, now_s + self.timeouts.drain_s
        log.info("%s: %s %s (%s)", self._action, step.phase.value, step.instance, sts)

    def _try_start(self, step: Step, now_s: float) -> bool:
        """Start a later step of a change; on failure drop the rest, undo a switch's removal, record why."""
        try:
            self._start(step, now_s)
            return True
        except (KubectlError, UserError) as exc:
            self._steps[:] = []
            why = f"{'adding back' if step.rollback else 'starting'} a {step.role.value} instance: {exc}"
            undo = _undo_of_removal(self._action)
            if undo is not None and not step.rollback:
                self._steps.append(Step(undo, add=True, rollback=True))
                why += f"; adding back the {undo.value} instance the switch removed"
            self._fail(now_s, why)
            return False

    def _advance(self, step: Step, now_s: float) -> bool:
        """Move `step` on; True once it has taken effect (or failed, recorded, and been undone)."""
        if step.phase is Phase.STARTING:
            if self._registered(step):
                return True
            if now_s > step.deadline_s:
                self._failed_start(step, now_s)
                return True
        elif step.phase is Phase.DRAINING:
            return self._drain(step, now_s)
        elif step.phase is Phase.STOPPING:
            if self.redis.exists(instance_key(step.instance)) and now_s <= step.deadline_s:
                return False
            if now_s > step.deadline_s:
                log.warning("%s still registered %.0fs after scale-down; its registration expires with its "
                            "heartbeat", step.instance, self.timeouts.gone_s)
            self.redis.delete(drain_key(step.instance))
            return True
        return False

    def _drain(self, step: Step, now_s: float) -> bool:
        """Scale down once the drained instance has been idle for settle_s, or its drain deadline passed."""
        if self._idle(step.instance):
            if step.idle_since_s is None:
                step.idle_since_s = now_s
            if now_s - step.idle_since_s < self.timeouts.settle_s:
                return False
        else:
            step.idle_since_s = None
            if now_s <= step.deadline_s:
                return False
            log.warning("%s still has work after %.0fs of draining; scaling down (the routers move its "
                        "requests elsewhere)", step.instance, self.timeouts.drain_s)
        n = self.replicas[step.role]
        try:
            self.kubectl.scale(self.target.statefulsets[step.role], n - 1, n)
        except (KubectlError, UserError) as exc:
            self.redis.delete(drain_key(step.instance))  # back in service: the shape is unchanged
            self._fail(now_s, f"scaling {step.role.value} down failed ({exc}); {step.instance} is serving again")
            self._steps[1:] = []
            return True
        self.replicas[step.role] = n - 1
        step.phase, step.deadline_s = Phase.STOPPING, now_s + self.timeouts.gone_s
        return False

    def _failed_start(self, step: Step, now_s: float) -> None:
        """The new instance never registered: remove its pod, and undo a switch's removal."""
        n = self.replicas[step.role]
        why = f"{step.instance} not registered {self.timeouts.startup_s:.0f}s after scaling up"
        try:
            self.kubectl.scale(self.target.statefulsets[step.role], n - 1, n)
            self.replicas[step.role] = n - 1
            why += f"; {step.role.value} scaled back to {n - 1}"
        except (KubectlError, UserError) as exc:
            why += f"; scaling it back failed too ({exc})"
        self._steps[1:] = []
        undo = _undo_of_removal(self._action)
        if undo is not None and not step.rollback:
            self._steps.append(Step(undo, add=True, rollback=True))
            why += f"; adding back the {undo.value} instance the switch removed"
        self._fail(now_s, why)

    def _registered(self, step: Step) -> bool:
        iid = step.instance
        return bool(self.redis.exists(instance_key(iid)) and self.redis.sismember(role_set_key(step.role), iid)
                    and not self.redis.exists(drain_key(iid)))

    def _idle(self, iid: str) -> bool:
        """Nothing queued, running or waiting for its KV to be pulled (the same test a local retirement
        makes, triton/retire.py); an instance gone from Redis is idle."""
        return not in_flight(self.redis, iid)

    def _fail(self, now_s: float, message: str) -> None:
        """Logged and reported once per change (the live loop records it and backs off)."""
        log.error("autoscaler: %s", message)
        if self._failure is None:
            self._failure = message
            self._outcomes.append(ChangeOutcome(self._action, False, message, self._started_s, now_s))


def _one(role: Role, add: bool) -> Action:
    if role is Role.PREFILL:
        return Action.ADD_PREFILL if add else Action.REMOVE_PREFILL
    return Action.ADD_DECODE if add else Action.REMOVE_DECODE


def _steps_for(action: Action) -> list[Step]:
    """An action as removals and additions, removal first (a switch frees the GPUs it then uses)."""
    return {
        Action.ADD_PREFILL: [Step(Role.PREFILL, add=True)],
        Action.ADD_DECODE: [Step(Role.DECODE, add=True)],
        Action.REMOVE_PREFILL: [Step(Role.PREFILL, add=False)],
        Action.REMOVE_DECODE: [Step(Role.DECODE, add=False)],
        Action.PREFILL_TO_DECODE: [Step(Role.PREFILL, add=False), Step(Role.DECODE, add=True)],
        Action.DECODE_TO_PREFILL: [Step(Role.DECODE, add=False), Step(Role.PREFILL, add=True)],
    }[action]


def _undo_of_removal(action: Action) -> Role | None:
    """The role a switch removed an instance of (added back when the switch's addition fails)."""
    return {Action.PREFILL_TO_DECODE: Role.PREFILL, Action.DECODE_TO_PREFILL: Role.DECODE}.get(action)


