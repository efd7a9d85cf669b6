"""The autoscaler's Kubernetes actuator against the manifests `render --k8s` writes: every StatefulSet,
ConfigMap and namespace it names exists in the rendered objects, the instance id it waits for is the one the
rendered pod of that ordinal starts, the pod of every ordinal it may add finds its instance in the ConfigMap,
and the rendered Role allows exactly the calls it makes (a fake kubectl records them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.unit.k8s.fake_kubectl import FakeKubectl
from trt_disagg.commands.serve import parse_instance
from trt_disagg.config import Deployment, load_deployment, parse_deployment
from trt_disagg.contract import Role
from trt_disagg.controller.k8s_actuator import K8sTarget, Kubectl, KubernetesActuator
from trt_disagg.errors import UserError
from trt_disagg.k8s.manifests import (
    AUTOSCALER_FILE,
    K8S_VERSION,
    POD_INDEX_LABEL,
    K8sOptions,
    instance_id,
    render_k8s,
)
from trt_disagg.node_placement import NodePool, with_node_placement
from trt_disagg.triton.render import plan_instances

REPO = Path(__file__).resolve().parents[3]
CONFIGS = [REPO / "configs" / "tiny.yaml", REPO / "configs" / "llama3-70b-8xh100.yaml"]


def by_kind(objs: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def pod_instance_id(sts: dict, ordinal: int) -> str:
    """What the rendered pod of `ordinal` registers as: its env (the pod-index label) substituted into its
    command, then `serve --instance`'s own parsing."""
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    env = {}
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif e["valueFrom"].get("fieldRef", {}).get("fieldPath") == f"metadata.labels['{POD_INDEX_LABEL}']":
            env[e["name"]] = str(ordinal)  # the label the StatefulSet controller puts on pod <sts>-<ordinal>
    argv = c["command"]
    spec = argv[argv.index("--instance") + 1]
    for name, value in env.items():
        spec = spec.replace(f"$({name})", value)
    return parse_instance(spec)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_the_actuator_targets_what_render_writes(config: Path, tmp_path: Path):
    dep = load_deployment(config)
    objs = render_k8s(dep).objects()
    target = K8sTarget.for_deployment(dep)
    statefulsets, config_maps = by_kind(objs, "StatefulSet"), by_kind(objs, "ConfigMap")
    assert set(target.statefulsets.values()) <= set(statefulsets)
    assert target.config_map in config_maps
    pod_dep = parse_deployment(yaml.safe_load(config_maps[target.config_map]["data"]["deployment.yaml"]))
    for role, name in target.statefulsets.items():
        sts = statefulsets[name]
        assert sts["metadata"]["labels"]["app.kubernetes.io/component"] == role.value
        assert sts["spec"]["replicas"] == dep.groups()[role].num_instances  # starts at the planned shape
        capacity = pod_dep.groups()[role].num_instances
        assert capacity >= dep.groups()[role].num_instances + 1  # headroom: a pod can be added
        planned = {p.instance_id for p in plan_instances(pod_dep) if p.role is role}
        for ordinal in range(capacity):
            iid = pod_instance_id(sts, ordinal)
            assert iid == instance_id(role, ordinal)  # the id the actuator waits for / drains
            assert iid in planned  # `serve --instance` finds it in the ConfigMap's deployment
        assert pod_instance_id(sts, capacity) not in planned
        (c,) = sts["spec"]["template"]["spec"]["containers"]
        gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
        for plan in plan_instances(pod_dep):
            if plan.role is role and gpus is not None:  # every ordinal's device ids exist in its pod
                assert sorted(plan.gpu_device_ids) == list(range(gpus)), (plan.instance_id, plan.gpu_device_ids)


def test_the_config_map_lists_what_max_instances_per_role_says():
    dep = load_deployment(CONFIGS[0])
    objs = render_k8s(dep, K8sOptions(max_instances_per_role=3)).objects()
    (cm,) = by_kind(objs, "ConfigMap").values()
    pod_dep = parse_deployment(yaml.safe_load(cm["data"]["deployment.yaml"]))
    assert [pod_dep.groups()[r].num_instances for r in (Role.PREFILL, Role.DECODE, Role.COLOCATED)] == [3, 3, 1]
    assert pod_dep.context_servers is not None and len(pod_dep.context_servers.urls) == 3
    with pytest.raises(UserError, match="max_instances_per_role"):
        K8sOptions(max_instances_per_role=0)


def _rules_allow(role_obj: dict, verb: str, resource: str, name: str, group: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
               and name in r.get("resourceNames", [name]) for r in role_obj["rules"])


def _needed(call: list[str]) -> list[tuple[str, str, str, str]]:
    """(verb, resource, name, API group) a kubectl call needs, as the API server checks them."""
    if call[0] == "get":
        kind, name = call[1], call[2]
        return [("get", f"{kind}s", name, "apps" if kind == "statefulset" else "")]
    name = call[1].split("/", 1)[1]  # scale statefulset/NAME --current-replicas: get the object, get+update scale
    return [("get", "statefulsets", name, "apps"), ("get", "statefulsets/scale", name, "apps"),
            ("update", "statefulsets/scale", name, "apps")]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_the_rendered_role_allows_every_call_the_actuator_makes(config: Path, tmp_path: Path, valkey_sync):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    manifests = render_k8s(load_deployment(config))
    rbac = manifests.files[AUTOSCALER_FILE]
    for obj in rbac:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    role_obj = next(o for o in rbac if o["kind"] == "Role")
    binding = next(o for o in rbac if o["kind"] == "RoleBinding")
    account = next(o for o in rbac if o["kind"] == "ServiceAccount")
    assert binding["roleRef"]["name"] == role_obj["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"]}]

    dep = load_deployment(config)
    fake = FakeKubectl.install(tmp_path, manifests.objects(), namespace="llm")
    actuator = KubernetesActuator.connect(dep, Kubectl(str(fake.path), "llm", sleep=lambda s: None), valkey_sync)
    from trt_disagg.controller.policy import Action

    actuator.apply(Action.ADD_DECODE, 0.0)
    calls = fake.calls()
    assert {c[0] for c in calls} == {"get", "scale"} and all(c[-2:] == ["-n", "llm"] for c in calls)
    for call in calls:
        for verb, resource, name, group in _needed(call):
            assert _rules_allow(role_obj, verb, resource, name, group), (call, verb, resource)
    assert not _rules_allow(role_obj, "update", "statefulsets/scale", "llama3-70b-router", "apps")


def test_a_deployment_pinned_to_nodes_is_refused_with_the_reason():
    dep = load_deployment(REPO / "configs" / "planned" / "opt-13b-a100-80g-1x8.yaml")
    dep = dep.model_copy(update={
        "context_servers": dep.context_servers.model_copy(update={"num_instances": 2}),
        "generation_servers": dep.generation_servers.model_copy(update={"num_instances": 2})})
    placed = with_node_placement(dep, [NodePool("a100-80g", 2, 8)], "low")
    assert placed.context_servers is not None and placed.context_servers.nodes
    with pytest.raises(UserError, match="one StatefulSet per instance"):
        K8sTarget.for_deployment(placed)
    assert AUTOSCALER_FILE not in render_k8s(placed).files  # nothing to grant: it cannot be scaled


def test_a_colocated_only_deployment_is_refused():
    dep: Deployment = load_deployment(CONFIGS[0])
    colocated = dep.model_copy(update={"context_servers": None, "generation_servers": None})
    with pytest.raises(UserError, match="prefill and decode"):
        K8sTarget.for_deployment(colocated)
