"""The Kubernetes actuator walked through its changes with a fake kubectl (replica counts in a file, every argv
recorded) and the real embedded Valkey, where pods "register" the way instances do (triton.registry):

    (1) add: scale up by one, busy until the new ordinal's instance registers; past the deadline, scaled back
    (2) remove: drain mark on the highest ordinal, no scale while it has work, then scale down, then clear
    (3) switch: remove one of the old role, then add one of the new; a failed addition restores the old
    (4) kubectl failures: retried with back-off, a lost reply is not a double scale, a failure is reported
    (5) never a role at zero, never past what the ConfigMap lists
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as sync_redis

from tests.unit.k8s.fake_kubectl import FakeKubectl
from trt_disagg.commands.autoscale import _check_mode
from trt_disagg.config import Deployment, load_deployment
from trt_disagg.contract import InstanceInfo, InstanceLoad, Role
from trt_disagg.controller.actuator import ReportsOutcomes
from trt_disagg.controller.k8s_actuator import Kubectl, KubectlError, KubernetesActuator, Timeouts
from trt_disagg.controller.policy import Action, Shape
from trt_disagg.errors import UserError
from trt_disagg.k8s.manifests import K8sOptions, render_k8s
from trt_disagg.keys import drain_key
from trt_disagg.triton.registry import Registrar

REPO = Path(__file__).resolve().parents[3]
CLI = str(Path(sys.executable).parent / "trt-disagg")
TIMEOUTS = Timeouts(startup_s=60.0, drain_s=30.0, settle_s=2.0, gone_s=20.0)
PREFILL, DECODE = "tiny-prefill", "tiny-decode"


class Pod:
    """An instance as Redis sees it: registered by the instances' own Registrar, with a load we set."""

    def __init__(self, client: sync_redis.Redis, iid: str) -> None:
        role = Role(iid.rsplit("-", 1)[0])
        self.load = InstanceLoad(free_kv_blocks=10, total_kv_blocks=10)
        info = InstanceInfo(iid, role, "10.0.0.1", f"{iid}.tiny-{role.value}:8001", "", "", 1, 1, 1024, "f",
                            role.value)
        self.registrar = Registrar(client, info, lambda: self.load, ttl_s=120.0, interval_s=60.0)
        self.registrar.beat()

    def set_load(self, **fields: int) -> None:
        self.load = InstanceLoad(**fields)
        self.registrar.beat()

    def gone(self) -> None:
        self.registrar.stop()  # what a terminated pod's instance does: leaves the registry


@pytest.fixture
def cluster(tmp_path: Path, valkey_sync: sync_redis.Redis) -> Iterator[Callable[..., tuple]]:
    pods: list[Pod] = []

    def make(num_prefill: int = 1, num_decode: int = 1, opts: K8sOptions | None = None
             ) -> tuple[KubernetesActuator, FakeKubectl, list[float], dict[str, Pod]]:
        dep = _tiny(num_prefill, num_decode)
        fake = FakeKubectl.install(tmp_path / "cluster", render_k8s(dep, opts).objects(), namespace="llm")
        sleeps: list[float] = []
        kubectl = Kubectl(str(fake.path), "llm", sleep=sleeps.append)
        actuator = KubernetesActuator.connect(dep, kubectl, valkey_sync, TIMEOUTS)
        running = {f"prefill-{i}": Pod(valkey_sync, f"prefill-{i}") for i in range(num_prefill)}
        running |= {f"decode-{i}": Pod(valkey_sync, f"decode-{i}") for i in range(num_decode)}
        pods.extend(running.values())
        fake.log_path.write_text("")  # what `connect` read is checked elsewhere: keep the changes
        return actuator, fake, sleeps, running

    yield make
    for pod in pods:
        pod.registrar.stop()


def _tiny(num_prefill: int, num_decode: int) -> Deployment:
    dep = load_deployment(REPO / "configs" / "tiny.yaml")
    assert dep.context_servers is not None and dep.generation_servers is not None
    return dep.model_copy(update={
        "context_servers": dep.context_servers.model_copy(update={"num_instances": num_prefill}),
        "generation_servers": dep.generation_servers.model_copy(update={"num_instances": num_decode})})


def scale(sts: str, to: int, current: int) -> list[str]:
    return ["scale", f"statefulset/{sts}", f"--replicas={to}", f"--current-replicas={current}", "-n", "llm"]


def test_add_scales_up_and_stays_busy_until_the_new_ordinal_registers(cluster, valkey_sync):
    actuator, fake, _, _ = cluster(1, 1)
    assert isinstance(actuator, ReportsOutcomes)
    actuator.apply(Action.ADD_PREFILL, 0.0)
    assert fake.scale_calls() == [scale(PREFILL, 2, 1)] and fake.replicas(PREFILL) == 2
    assert actuator.shape() == Shape(2, 1)
    Pod(valkey_sync, "prefill-2")  # not the pod that was added: does not count
    assert actuator.busy(10.0) and actuator.take_outcomes() == []
    Pod(valkey_sync, "prefill-1")
    assert not actuator.busy(11.0)
    (outcome,) = actuator.take_outcomes()
    assert outcome.ok and outcome.action is Action.ADD_PREFILL and outcome.finished_s == 11.0


def test_an_instance_that_never_registers_is_scaled_back_and_reported(cluster):
    actuator, fake, _, _ = cluster(1, 1)
    actuator.apply(Action.ADD_DECODE, 0.0)
    assert actuator.busy(59.0)
    assert not actuator.busy(61.0)
    assert fake.scale_calls() == [scale(DECODE, 2, 1), scale(DECODE, 1, 2)] and fake.replicas(DECODE) == 1
    (outcome,) = actuator.take_outcomes()
    assert not outcome.ok and "decode-1 not registered 60s after scaling up" in outcome.detail
    assert "scaled back to 1" in outcome.detail and actuator.shape() == Shape(1, 1)


def test_remove_drains_the_highest_ordinal_and_scales_down_only_once_it_is_idle(cluster, valkey_sync):
    actuator, fake, _, pods = cluster(2, 1)
    pods["prefill-1"].set_load(running_sequences=1, pending_kv_handoffs=1)
    actuator.apply(Action.REMOVE_PREFILL, 0.0)
    assert valkey_sync.exists(drain_key("prefill-1")) and not valkey_sync.exists(drain_key("prefill-0"))
    assert actuator.busy(5.0) and actuator.busy(20.0) and fake.scale_calls() == []  # work in flight
    pods["prefill-1"].set_load(pending_kv_handoffs=1)  # sequences done; its KV not pulled yet
    assert actuator.busy(21.0) and fake.scale_calls() == []
    pods["prefill-1"].set_load()
    assert actuator.busy(22.0) and fake.scale_calls() == []  # idle: settling (a dispatch may be in the air)
    assert actuator.busy(24.5)
    assert fake.scale_calls() == [scale(PREFILL, 1, 2)] and fake.replicas(PREFILL) == 1
    assert actuator.busy(25.0)  # its pod is terminating: still registered
    pods["prefill-1"].gone()
    assert not actuator.busy(26.0)
    assert not valkey_sync.exists(drain_key("prefill-1"))  # the ordinal may come back later, undrained
    (outcome,) = actuator.take_outcomes()
    assert outcome.ok and actuator.shape() == Shape(1, 1)


def test_a_drain_that_never_empties_is_bounded_by_its_deadline(cluster):
    actuator, fake, _, pods = cluster(1, 2)
    pods["decode-1"].set_load(running_sequences=3)
    actuator.apply(Action.REMOVE_DECODE, 0.0)
    assert actuator.busy(30.0) and fake.scale_calls() == []
    assert actuator.busy(31.0) and fake.scale_calls() == [scale(DECODE, 1, 2)]


def test_a_role_switch_removes_one_then_adds_one(cluster, valkey_sync):
    actuator, fake, _, pods = cluster(1, 2)
    actuator.apply(Action.DECODE_TO_PREFILL, 0.0)
    assert actuator.shape() == Shape(2, 1) and valkey_sync.exists(drain_key("decode-1"))
    assert actuator.busy(0.0) and actuator.busy(3.0)
    pods["decode-1"].gone()
    assert actuator.busy(4.0)  # decode-1 gone; prefill scaled up, prefill-1 not registered yet
    assert fake.scale_calls() == [scale(DECODE, 1, 2), scale(PREFILL, 2, 1)]
    Pod(valkey_sync, "prefill-1")
    assert not actuator.busy(5.0)
    (outcome,) = actuator.take_outcomes()
    assert outcome.ok and outcome.action is Action.DECODE_TO_PREFILL


def test_a_switch_whose_addition_fails_adds_back_what_it_removed(cluster, valkey_sync):
    actuator, fake, _, pods = cluster(2, 1)
    actuator.apply(Action.PREFILL_TO_DECODE, 0.0)
    actuator.busy(0.0)
    pods["prefill-1"].gone()
    assert actuator.busy(3.0) and actuator.busy(4.0)  # decode-1 starting
    assert actuator.busy(70.0)  # decode-1 never registered: decode scaled back, prefill-1 being added back
    (outcome,) = actuator.take_outcomes()
    assert not outcome.ok and "adding back the prefill instance" in outcome.detail
    Pod(valkey_sync, "prefill-1")
    assert not actuator.busy(71.0) and actuator.take_outcomes() == []  # the failure was reported once
    assert fake.scale_calls() == [scale(PREFILL, 1, 2), scale(DECODE, 2, 1), scale(DECODE, 1, 2),
                                  scale(PREFILL, 2, 1)]
    assert (fake.replicas(PREFILL), fake.replicas(DECODE)) == (2, 1)


def test_kubectl_failures_are_retried_with_back_off(cluster):
    actuator, fake, sleeps, _ = cluster(1, 1)
    fake.set(fail_next=2, fail_verb="scale")
    actuator.apply(Action.ADD_DECODE, 0.0)
    assert sleeps == [1.0, 2.0] and fake.scale_calls() == [scale(DECODE, 2, 1)] * 3
    assert fake.replicas(DECODE) == 2
    fake.set(fail_next=1, fail_verb="get")  # reads are retried too
    assert actuator.kubectl.replicas(DECODE) == 2 and sleeps == [1.0, 2.0, 1.0]


def test_a_change_starts_from_the_replicas_the_cluster_has_now(cluster, valkey_sync):
    actuator, fake, _, _ = cluster(1, 1)
    subprocess.run([str(fake.path), "scale", "statefulset/tiny-decode", "--replicas=2", "-n", "llm"], check=True,
                   capture_output=True)  # an operator, by hand
    Pod(valkey_sync, "decode-1")
    actuator.apply(Action.ADD_DECODE, 0.0)
    assert fake.scale_calls()[-1] == scale(DECODE, 3, 2) and actuator.shape() == Shape(1, 3)


def test_a_lost_reply_is_not_scaled_twice(cluster):
    actuator, fake, _, _ = cluster(1, 1)
    fake.set(lose_reply_next=1)  # the API server applied the scale, the reply never came
    actuator.apply(Action.ADD_DECODE, 0.0)
    assert fake.replicas(DECODE) == 2 and actuator.shape() == Shape(1, 2)


def test_a_kubectl_that_keeps_failing_leaves_the_shape_and_says_why(cluster, valkey_sync):
    actuator, fake, sleeps, pods = cluster(1, 2)
    fake.set(fail_next=100)
    with pytest.raises(KubectlError, match="i/o timeout"):
        actuator.apply(Action.ADD_PREFILL, 0.0)  # raised: the live loop records it as failed
    assert len(sleeps) == 3 and fake.replicas(PREFILL) == 1 and not actuator.busy(1.0)
    fake.set(fail_next=0)
    actuator.apply(Action.REMOVE_DECODE, 10.0)
    fake.set(fail_next=100)
    actuator.busy(10.0)
    assert not actuator.busy(13.0)  # scale-down failed after the drain: back in service
    assert not valkey_sync.exists(drain_key("decode-1")) and fake.replicas(DECODE) == 2
    (outcome,) = actuator.take_outcomes()
    assert not outcome.ok and "decode-1 is serving again" in outcome.detail


def test_no_role_is_ever_scaled_to_zero(cluster, valkey_sync):
    actuator, fake, _, _ = cluster(1, 1)
    for action in (Action.REMOVE_PREFILL, Action.REMOVE_DECODE, Action.PREFILL_TO_DECODE, Action.DECODE_TO_PREFILL):
        with pytest.raises(UserError, match="a role keeps one instance"):
            actuator.apply(action, 0.0)
    with pytest.raises(UserError, match="a role keeps one instance"):
        actuator.kubectl.scale(PREFILL, 0, 1)
    assert fake.scale_calls() == [] and not valkey_sync.keys("trtd:drain:*")


def test_no_role_grows_past_what_the_config_map_lists(cluster):
    actuator, fake, _, _ = cluster(2, 1, K8sOptions(max_instances_per_role=2))
    with pytest.raises(UserError, match=r"prefill-2 is not in configmap/tiny-config \(it lists 2"):
        actuator.apply(Action.ADD_PREFILL, 0.0)
    assert fake.scale_calls() == []


def test_cli_modes_are_exclusive_and_k8s_needs_the_config():
    cases = [((False, False, None, None, None), "choose one of --dry-run"),
             ((True, True, Path("d.yaml"), None, None), "choose one of --dry-run"),
             ((True, False, None, "llm", None), "--namespace: only with --k8s"),
             ((False, True, None, "llm", None), "--k8s needs --config")]
    for (dry_run, k8s, config, namespace, kubectl), message in cases:
        with pytest.raises(UserError, match=message):
            _check_mode(dry_run, k8s, config, namespace, kubectl, None, None)
    args = _check_mode(False, True, Path("d.yaml"), "llm", None, None, None)
    assert args is not None and args.kubectl == "kubectl" and args.namespace == "llm"


def test_cli_exits_2_on_a_bad_combination():
    done = subprocess.run([CLI, "autoscale", "--model", "opt-13b", "--dry-run", "--k8s"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "choose one of --dry-run" in done.stderr


async def test_the_live_loop_records_a_change_that_failed_after_apply(cluster, valkey_url):
    """(4) through the controller's own loop: the failed start is a decision record with the reason."""
    import json

    import redis.asyncio as aioredis

    from tests.unit.controller.test_policy import CapacityPredictor
    from trt_disagg.controller.live import ControllerLoop, LoopSettings
    from trt_disagg.controller.policy import Budget, Controller, ControllerConfig
    from trt_disagg.keys import autoscale_decisions_key

    actuator, fake, _, _ = cluster(1, 1)
    actuator.apply(Action.ADD_PREFILL, 0.0)
    controller = Controller(ControllerConfig(interval_s=1.0, window_s=10.0), Budget(3), CapacityPredictor(1, 1))
    client = aioredis.from_url(valkey_url)
    try:
        loop = ControllerLoop(client, controller, actuator, LoopSettings(), clock=lambda: 100.0)
        assert not actuator.busy(100.0)  # past the start-up deadline: scaled back
        await loop.step()
        records = [json.loads(f[b"d"]) for _, f in await client.xrange(autoscale_decisions_key())]
    finally:
        await client.aclose()
    failed = [r for r in records if r.get("failed") == "add_prefill"]
    assert len(failed) == 1 and "prefill-1 not registered" in failed[0]["reason"]
    assert controller.retry_at_s is not None and fake.replicas(PREFILL) == 1


def test_autoscale_k8s_once_reads_the_cluster_through_kubectl(tmp_path, valkey_url, valkey_sync):
    """The command's wiring: names from --config, kubectl from --kubectl, one decision, nothing to scale."""
    dep = _tiny(1, 1)
    fake = FakeKubectl.install(tmp_path / "cluster", render_k8s(dep).objects(), namespace="llm")
    done = subprocess.run([CLI, "autoscale", "--k8s", "--once", "--config", str(REPO / "configs" / "tiny.yaml"),
                           "--namespace", "llm", "--kubectl", str(fake.path), "--redis-url", valkey_url,
                           "--model", "opt-13b", "--gpu", "a100-80g", "--max-instances", "4"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "too little to decide on" in done.stdout
    assert fake.calls() == [["get", "statefulset", PREFILL, "-o", "json", "-n", "llm"],
                            ["get", "statefulset", DECODE, "-o", "json", "-n", "llm"],
                            ["get", "configmap", "tiny-config", "-o", "json", "-n", "llm"]]


@pytest.mark.slow
def test_autoscale_k8s_adds_an_instance_under_load_and_waits_for_it(tmp_path, valkey_url, valkey_sync):
    """The whole path: an overloaded 1P1D in the finished-request stream -> the controller decides add_prefill ->
    kubectl scales the prefill StatefulSet -> `--once` keeps running until prefill-1 registers, then exits."""
    import time

    from trt_disagg.keys import finished_key

    dep = load_deployment(REPO / "configs" / "llama3-70b-8xh100.yaml")
    fake = FakeKubectl.install(tmp_path / "cluster", render_k8s(dep).objects(), namespace="llm")
    pods = [Pod(valkey_sync, "prefill-0"), Pod(valkey_sync, "decode-0")]
    now = time.time()
    for i in range(500):  # 5 req/s of 6000-token prompts with a 3 s TTFT: the 1 s SLO is missed throughout
        t0 = now - 100 + i * 0.2
        valkey_sync.xadd(finished_key(), {"s": "DONE", "t0": t0, "t1": t0 + 3.0, "t2": t0 + 4.9, "p": 6000, "o": 64},
                         id=f"{int((t0 + 5) * 1000)}-{i}")
    cmd = [CLI, "autoscale", "--k8s", "--once", "--config", str(REPO / "configs" / "llama3-70b-8xh100.yaml"),
           "--namespace", "llm", "--kubectl", str(fake.path), "--redis-url", valkey_url, "--model", "llama-3-70b",
           "--max-instances", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not fake.scale_calls() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert fake.scale_calls() == [scale("llama3-70b-prefill", 2, 1)], proc.stderr.read() if proc.poll() else ""
        assert proc.poll() is None  # prefill-1 has not registered: the change is still taking effect
        pods.append(Pod(valkey_sync, "prefill-1"))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pod in pods:
            pod.gone()
    assert proc.returncode == 0, err
    assert '"action": "add_prefill"' in out and fake.replicas("llama3-70b-prefill") == 2
