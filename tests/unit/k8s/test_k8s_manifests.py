"""`render --k8s`: every object passes the Kubernetes API schema (offline, pinned version), instances ask for
their TP x PP GPUs, probe Triton's health API, read secrets only from Secrets, and planned placements become
node affinity."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trt_disagg.config import load_deployment
from trt_disagg.errors import UserError
from trt_disagg.k8s.manifests import K8S_VERSION, NODE_LABEL, SECRET_FILE, render_k8s
from trt_disagg.node_placement import NodePool, with_node_placement

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="dev extra: pip install kubernetes-validate")

REPO = Path(__file__).resolve().parents[3]
CLI = str(Path(sys.executable).parent / "trt-disagg")


def validate_all(objs: list[dict]) -> None:
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises on any unknown or mistyped field


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def containers(obj: dict) -> list[dict]:
    return obj["spec"]["template"]["spec"]["containers"]


def secret_values(objs: list[dict]) -> list[str]:
    return [v for s in by_kind(objs, "Secret") for v in s["stringData"].values()]


def test_the_validator_rejects_a_broken_object():
    """The schema check is real: a mistyped field fails it."""
    objs = render_k8s(load_deployment(REPO / "configs" / "llama3-70b-8xh100.yaml")).objects()
    sts = by_kind(objs, "StatefulSet")[0]
    sts["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSION, strict=True)


def test_llama3_70b_manifests_validate_with_gpus_probes_and_secrets():
    objs = render_k8s(load_deployment(REPO / "configs" / "llama3-70b-8xh100.yaml")).objects()
    validate_all(objs)
    sts = {o["metadata"]["name"]: o for o in by_kind(objs, "StatefulSet")}
    assert set(sts) == {"llama3-70b-prefill", "llama3-70b-decode"}
    for name, gpus in (("llama3-70b-prefill", 4), ("llama3-70b-decode", 4)):  # TP4; TP2 x PP2
        (c,) = containers(sts[name])
        assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert {"name": "TRT_DISAGG_HTTP_PORT", "value": str(c["readinessProbe"]["httpGet"]["port"])} in c["env"]
    assert len(by_kind(objs, "PodDisruptionBudget")) == 3  # prefill, decode, router
    assert [d["metadata"]["name"] for d in by_kind(objs, "Deployment")] == ["llama3-70b-router"]  # external Redis
    assert {s["metadata"]["name"] for s in by_kind(objs, "Service")} >= {"llama3-70b-router"}
    assert "affinity" not in sts["llama3-70b-prefill"]["spec"]["template"]["spec"]  # no plan placement


def test_no_secret_outside_the_secret():
    objs = render_k8s(load_deployment(REPO / "configs" / "tiny.yaml")).objects()
    validate_all(objs)
    values = secret_values(objs)
    assert len(values) == 3 and all(len(v) >= 24 for v in values)
    others = yaml.safe_dump_all([o for o in objs if o["kind"] != "Secret"])
    assert not any(v in others for v in values)
    (cm,) = by_kind(objs, "ConfigMap")
    assert "password" not in cm["data"]["deployment.yaml"].lower()
    for obj in by_kind(objs, "StatefulSet") + by_kind(objs, "Deployment"):
        for c in containers(obj):
            env = {e["name"]: e for e in c["env"]}
            for var in ("TRT_DISAGG_KV_SECRET", "REDIS_PASSWORD", "TRT_DISAGG_ROUTER_ADMIN_TOKEN"):
                if var in env:
                    assert "secretKeyRef" in env[var]["valueFrom"], var
    # a fresh secret per render: never a constant default
    assert set(values).isdisjoint(secret_values(render_k8s(load_deployment(REPO / "configs" / "tiny.yaml")).objects()))


def test_an_external_redis_password_stays_out_of_the_config_map(tmp_path):
    text = (REPO / "configs" / "llama3-70b-8xh100.yaml").read_text().replace(
        'redis://redis:6379/0', 'redis://:hunter2@redis:6379/0')
    cfg = tmp_path / "dep.yaml"
    cfg.write_text(text)
    objs = render_k8s(load_deployment(cfg)).objects()
    assert "hunter2" not in yaml.safe_dump_all(objs)


def test_planned_placement_becomes_node_affinity_and_nvlink_segments_share_a_node():
    dep = load_deployment(REPO / "configs" / "planned" / "opt-13b-a100-80g-1x8.yaml")
    dep = dep.model_copy(update={
        "context_servers": dep.context_servers.model_copy(update={"num_instances": 2}),
        "generation_servers": dep.generation_servers.model_copy(update={"num_instances": 2})})
    placed = with_node_placement(dep, [NodePool("a100-80g", 2, 8)], "low")
    objs = render_k8s(placed).objects()
    validate_all(objs)
    node_of: dict[str, str] = {}
    for sts in by_kind(objs, "StatefulSet"):
        terms = sts["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        (expr,) = terms[0]["matchExpressions"]
        assert expr["key"] == NODE_LABEL
        node_of[sts["metadata"]["labels"]["trt-disagg.io/instance-id"]] = expr["values"][0]
    # Alg. 2: unit r (prefill-r and decode-r) on node r, so the KV hand-off stays on NVLink
    assert node_of == {"prefill-0": "node-0", "decode-0": "node-0", "prefill-1": "node-1", "decode-1": "node-1"}


def test_an_instance_over_several_nodes_is_refused_with_a_reason():
    dep = load_deployment(REPO / "configs" / "planned" / "opt-66b-a100-80g-4x8.yaml")  # decode TP2 x PP8
    placed = with_node_placement(dep, [NodePool("a100-80g", 4, 8)], "high")
    assert placed.generation_servers is not None and placed.generation_servers.nodes == [["node-0", "node-1"]]
    with pytest.raises(UserError, match="spans 2 nodes"):
        render_k8s(placed)


@pytest.mark.slow
def test_plan_for_two_nodes_then_render_k8s(tmp_path):
    """The user's path: `plan -o` on a multi-node cluster writes node placement; `render --k8s` pins it."""
    out = tmp_path / "planned.yaml"
    subprocess.run([CLI, "plan", "--model", "opt-13b", "--gpu", "a100-80g", "--nodes", "2", "--gpus-per-node", "8",
                    "--workload", "sharegpt", "--ttft", "0.4", "--tpot", "0.04", "--num-requests", "200",
                    "--affinity", "low", "--max-pp", "1", "-o", str(out)], check=True, capture_output=True)
    dep = load_deployment(out)
    assert dep.context_servers is not None and dep.generation_servers is not None
    assert dep.context_servers.nodes and dep.generation_servers.nodes
    manifests = tmp_path / "k8s"
    subprocess.run([CLI, "render", "--k8s", str(out), "-o", str(manifests)], check=True, capture_output=True)
    assert stat.S_IMODE((manifests / SECRET_FILE).stat().st_mode) == 0o600
    objs = [o for f in sorted(manifests.glob("*.yaml")) for o in yaml.safe_load_all(f.read_text())]
    validate_all(objs)
    gpus = sum(containers(s)[0]["resources"]["limits"]["nvidia.com/gpu"] for s in by_kind(objs, "StatefulSet"))
    assert gpus == dep.context_servers.num_instances * dep.context_servers.world_size + \
        dep.generation_servers.num_instances * dep.generation_servers.world_size
    nodes = {n for g in (dep.context_servers, dep.generation_servers) for inst in g.nodes for n in inst}
    assert nodes == {"node-0", "node-1"}


def test_a_python_group_on_cuda_asks_for_a_gpu_per_rank_and_one_on_cpu_for_cores():
    dep = load_deployment(REPO / "configs" / "tiny.yaml")
    assert dep.context_servers is not None
    on_cuda = dep.model_copy(update={"context_servers": dep.context_servers.model_copy(update={"device": "cuda"})})
    objs = render_k8s(on_cuda).objects()
    validate_all(objs)
    sts = {o["metadata"]["name"]: o for o in by_kind(objs, "StatefulSet")}
    (prefill,) = containers(sts["tiny-prefill"])
    assert prefill["resources"]["limits"]["nvidia.com/gpu"] == dep.context_servers.world_size
    (decode,) = containers(sts["tiny-decode"])
    assert "nvidia.com/gpu" not in decode["resources"]["limits"] and "cpu" in decode["resources"]["limits"]
