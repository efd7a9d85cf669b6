"""A deployment YAML as plain Kubernetes manifests: what `kubectl apply -f DIR` needs, nothing hidden.

    00-secret.yaml      Secret <name>-secrets: KV-handle HMAC key, Redis password, router admin token
    01-config.yaml      ConfigMap <name>-config: the deployment YAML every pod reads (no secret in it)
    10-redis.yaml       Redis (Valkey) Deployment + Service with a password   (absent with an external redis.url)
    20-prefill.yaml     per role: headless Service, StatefulSet(s), PodDisruptionBudget
    21-decode.yaml
    30-router.yaml      router Deployment + Service + PodDisruptionBudget
    40-autoscaler.yaml  ServiceAccount + Role + RoleBinding for `trt-disagg autoscale --k8s` (optional: only
                        what the controller needs, scaling the two StatefulSets and reading the ConfigMap)

Why StatefulSets for instances: an instance's identity matters. `trt-disagg serve CONFIG --instance ROLE:N`
starts instance N, and the pod's ordinal is N (the `apps.kubernetes.io/pod-index` label, Kubernetes >= 1.28),
with a stable DNS name (<sts>-N.<service>) that the ConfigMap's `urls` advertise to routers and to the
decode instances that pull KV. Each pod asks for its instance's TP x PP GPUs as `nvidia.com/gpu`.

Headroom for the autoscaler: `serve --instance prefill:N` starts only an instance its config lists, so the
ConfigMap lists `max_instances_per_role` instances of prefill and of decode (default SCALE_LIMIT_PER_ROLE)
while each StatefulSet starts with `num_instances` replicas. Routers find instances in Redis, not in the
config, so the listed ordinals that have no pod cost nothing; a pod the controller adds (the next ordinal)
finds its instance there. The actuator reads the ConfigMap and never scales a role past what it lists.

Placement: when the plan says where instances run (`ServerGroup.nodes`, written by `plan -o` for a multi-
node cluster), each instance gets its own StatefulSet pinned by node affinity to the node label
`trt-disagg.io/node` (the operator labels the real nodes once: `kubectl label node <host>
trt-disagg.io/node=node-0`). With NVLink-only plans (DistServe Alg. 2) a unit's prefill and decode
segments name the same node, so the affinity keeps the KV hand-off on NVLink. An instance that spans
nodes (one pipeline over several pods) needs a leader/worker set, which this renderer refuses with a
message rather than writing pods that cannot form one engine.

Secrets are generated here (fresh random values) and written only to 00-secret.yaml (mode 0600).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from trt_disagg.config import Deployment, ServerGroup, dump_deployment
from trt_disagg.contract import Role
from trt_disagg.errors import UserError
from trt_disagg.kv.handle import SECRET_ENV
from trt_disagg.triton.listen import BIND_HOST_ENV, PORT_ENVS

# The Kubernetes version the manifests are written for and validated against (apps/v1 StatefulSet pod-index
# label: 1.28+; policy/v1 PodDisruptionBudget: 1.21+).
K8S_VERSION = "1.31.0"
ADMIN_TOKEN_ENV = "TRT_DISAGG_ROUTER_ADMIN_TOKEN"  # read by `python -m router`
HTTP_PORT, GRPC_PORT, METRICS_PORT, KV_PORT = 8000, 8001, 8002, 8003
REDIS_PORT = 6379
CONFIG_MOUNT = "/etc/trt-disagg"
ENGINES_MOUNT = "/engines"
NODE_LABEL = "trt-disagg.io/node"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
FILE_FOR_ROLE = {Role.PREFILL: "20-prefill.yaml", Role.DECODE: "21-decode.yaml", Role.COLOCATED: "22-colocated.yaml"}
AUTOSCALER_FILE = "40-autoscaler.yaml"
SCALABLE_ROLES = (Role.PREFILL, Role.DECODE)  # the roles the autoscaler shapes (DistServe's two phases)
SCALE_LIMIT_PER_ROLE = 8  # instances of each scalable role the ConfigMap lists by default (one 8-GPU node's worth)

Obj = dict[str, Any]


@dataclass(frozen=True)
class K8sOptions:
    """What the deployment YAML does not say about a cluster."""

    image: str = "trt-disagg:latest"  # holds trt-disagg (+ tritonserver and TensorRT-LLM for GPU engines)
    redis_image: str = "valkey/valkey:8.0"
    engines_claim: str | None = None  # PVC with the built engines; default <name>-engines
    router_replicas: int = 2
    # Prefill and decode instances the ConfigMap lists (pods up to this ordinal can start); None:
    # max(num_instances, SCALE_LIMIT_PER_ROLE). Groups pinned to nodes list exactly their instances.
    max_instances_per_role: int | None = None

    def __post_init__(self) -> None:
        if self.max_instances_per_role is not None and self.max_instances_per_role < 1:
            raise UserError(f"max_instances_per_role must be >= 1, got {self.max_instances_per_role}")


@dataclass
class ManifestSet:
    """The objects of each file, in apply order."""

    files: dict[str, list[Obj]] = field(default_factory=dict)

    def objects(self) -> list[Obj]:
        return [o for objs in self.files.values() for o in objs]

    def write(self, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name, objs in self.files.items():
            path = out_dir / name
            path.write_text(yaml.dump_all(objs, Dumper=_PlainDumper, sort_keys=False))
            if name == SECRET_FILE:
                path.chmod(0o600)
            written.append(path)
        return written


SECRET_FILE = "00-secret.yaml"


class _PlainDumper(yaml.SafeDumper):
    """Writes shared dicts (labels used as selectors) out in full: no &anchors / *aliases for a reader to chase."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def k8s_name(text: str) -> str:
    """A DNS-1123 label (lowercase alphanumerics and '-'), short enough for a StatefulSet's pods."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if not name:
        raise UserError(f"{text!r} gives no usable Kubernetes name")
    return name[:40].rstrip("-")


@dataclass(frozen=True)
class ObjectNames:
    """Object names and labels of one deployment, and what every pod of it is given."""

    base: str
    image: str
    redis_url: str  # with $(REDIS_PASSWORD), which the kubelet fills in from the Secret

    def labels(self, component: str) -> dict[str, str]:
        return {"app.kubernetes.io/name": "trt-disagg", "app.kubernetes.io/instance": self.base,
                "app.kubernetes.io/component": component}

    @property
    def secret(self) -> str:
        return f"{self.base}-secrets"

    @property
    def config(self) -> str:
        return f"{self.base}-config"

    @property
    def redis(self) -> str:
        return f"{self.base}-redis"

    @property
    def router(self) -> str:
        return f"{self.base}-router"

    def role(self, role: Role) -> str:
        return f"{self.base}-{role.value}"


def object_names(dep: Deployment, opts: K8sOptions | None = None) -> ObjectNames:
    """The names of `dep`'s objects: what render_k8s writes and what the autoscaler's actuator targets."""
    opts = opts or K8sOptions()
    base = k8s_name(dep.name)
    return ObjectNames(base, opts.image, redis_url_template(dep.redis.url, f"{base}-redis"))


def instance_id(role: Role, ordinal: int) -> str:
    """The id instance `ordinal` of `role` registers under in Redis: the pod runs `serve --instance ROLE:N`,
    which starts the config's instance "<role>-<N>" (triton.render.plan_instances names them)."""
    return f"{role.value}-{ordinal}"


def role_capacity(group: ServerGroup, role: Role, opts: K8sOptions) -> int:
    """Instances of `role` the ConfigMap lists: the most its StatefulSet may be scaled to."""
    if group.nodes or role not in SCALABLE_ROLES:
        return group.num_instances
    limit = opts.max_instances_per_role if opts.max_instances_per_role is not None else SCALE_LIMIT_PER_ROLE
    return max(group.num_instances, limit)


def scalable(dep: Deployment) -> bool:
    """Prefill and decode each run as one StatefulSet (no node pinning): replica counts can shape them."""
    groups = dep.groups()
    return all(r in groups and not groups[r].nodes for r in SCALABLE_ROLES)


def render_k8s(dep: Deployment, opts: K8sOptions | None = None) -> ManifestSet:
    """Every object of `dep` on Kubernetes; raises UserError for what cannot be expressed."""
    opts = opts or K8sOptions()
    names = object_names(dep, opts)
    _check_renderable(dep)
    out = ManifestSet()
    out.files[SECRET_FILE] = [_secret(names)]
    out.files["01-config.yaml"] = [_config_map(names, in_cluster_deployment(dep, names, opts))]
    if dep.redis.url is None:
        out.files["10-redis.yaml"] = _redis(names, opts)
    for role, group in dep.groups().items():
        out.files[FILE_FOR_ROLE[role]] = _role_objects(names, role, group, dep, opts)
    out.files["30-router.yaml"] = _router(names, dep, opts)
    if scalable(dep):
        out.files[AUTOSCALER_FILE] = autoscaler_rbac(names)
    return out


def _check_renderable(dep: Deployment) -> None:
    for role, group in dep.groups().items():
        for i, nodes in enumerate(group.nodes):
            if len(nodes) > 1:
                raise UserError(f"{role.value}-{i} spans {len(nodes)} nodes ({', '.join(nodes)}): one engine over "
                                "several pods needs a leader/worker set (e.g. LeaderWorkerSet), which "
                                "`render --k8s` does not write; plan with instances that fit a node")


def redis_url_template(external_url: str | None, service: str) -> str:
    """The Redis URL pods use, with the password filled in from the Secret by the kubelet ($(REDIS_PASSWORD)).
    Any password in an external URL is dropped: the Secret's is the one that counts."""
    url = external_url or f"redis://{service}:{REDIS_PORT}/0"
    parts = urlsplit(url)
    host = parts.hostname or service
    netloc = f":$(REDIS_PASSWORD)@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path or "/0", parts.query, ""))


def in_cluster_deployment(dep: Deployment, names: ObjectNames, opts: K8sOptions | None = None) -> Deployment:
    """`dep` as pods see it: each instance advertised at its pod's stable DNS name, engines on the volume,
    the router listening on the pod's address (set here, explicitly), Redis by its Service name, and the
    autoscaler's headroom listed (`role_capacity`)."""
    opts = opts or K8sOptions()
    groups: dict[str, ServerGroup] = {}
    for role, group in dep.groups().items():
        n = role_capacity(group, role, opts)
        urls = [f"{_pod_dns(names, role, group, i)}:{GRPC_PORT}" for i in range(n)]
        # A pod sees only the GPUs it asked for (TP x PP), numbered from 0: device ids are taken modulo that,
        # not modulo a node's count (instance N of a role would otherwise get ids its pod does not have).
        update: dict[str, object] = {"urls": urls, "num_instances": n}
        if group.backend == "tensorrtllm":
            update["gpus_per_node"] = group.world_size
        groups[_FIELD[role]] = group.model_copy(update=update)
    # The password-less URL, for the reader: pods get REDIS_URL (which wins) with the password.
    redis_url = without_password(dep.redis.url or f"redis://{names.redis}:{REDIS_PORT}/0")
    return dep.model_copy(update={
        **groups, "engines_dir": ENGINES_MOUNT,
        "router": dep.router.model_copy(update={"host": "0.0.0.0", "port": dep.router.port or 8000}),
        "redis": dep.redis.model_copy(update={"url": redis_url}),
    })


_FIELD = {Role.PREFILL: "context_servers", Role.DECODE: "generation_servers", Role.COLOCATED: "colocated_servers"}


def statefulset_name(names: ObjectNames, role: Role, group: ServerGroup, index: int) -> str:
    """One StatefulSet per role (pod ordinal = instance index), or per instance when the plan pins nodes."""
    return f"{names.role(role)}-{index}" if group.nodes else names.role(role)


def _pod_dns(names: ObjectNames, role: Role, group: ServerGroup, index: int) -> str:
    pod = f"{statefulset_name(names, role, group, index)}-0" if group.nodes else f"{names.role(role)}-{index}"
    return f"{pod}.{names.role(role)}"


def _secret(names: ObjectNames) -> Obj:
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": names.secret, "labels": names.labels("secrets")},
            "type": "Opaque",
            "stringData": {"kv-secret": secrets.token_hex(32), "redis-password": secrets.token_urlsafe(24),
                           "admin-token": secrets.token_urlsafe(24)}}


def _config_map(names: ObjectNames, dep: Deployment) -> Obj:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": names.config, "labels": names.labels("config")},
            "data": {"deployment.yaml": dump_deployment(dep)}}


def _secret_env(names: ObjectNames, var: str, key: str) -> Obj:
    return {"name": var, "valueFrom": {"secretKeyRef": {"name": names.secret, "key": key}}}


def _redis(names: ObjectNames, opts: K8sOptions) -> list[Obj]:
    labels = names.labels("redis")
    container = {
        "name": "redis", "image": opts.redis_image,
        "command": ["valkey-server", "--requirepass", "$(REDIS_PASSWORD)", "--save", "", "--appendonly", "no",
                    "--port", str(REDIS_PORT)],
        "env": [_secret_env(names, "REDIS_PASSWORD", "redis-password")],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
        "readinessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": 10},
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
    }
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": {"name": names.redis, "labels": labels},
                  "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                           "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}}}}
    return [deployment, _service(names.redis, labels, [("redis", REDIS_PORT)])]


def _service(name: str, labels: dict[str, str], ports: list[tuple[str, int]], headless: bool = False) -> Obj:
    spec: Obj = {"selector": labels, "ports": [{"name": n, "port": p, "targetPort": p} for n, p in ports]}
    if headless:
        # DNS names for pods that are not ready yet: an instance resolves its own name to bind before ready.
        spec.update({"clusterIP": "None", "publishNotReadyAddresses": True})
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels}, "spec": spec}


def _pdb(name: str, labels: dict[str, str]) -> Obj:
    """A voluntary disruption (node drain, upgrade) takes at most one pod of the role at a time."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": name, "labels": labels},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}}}


def _role_objects(names: ObjectNames, role: Role, group: ServerGroup, dep: Deployment, opts: K8sOptions) -> list[Obj]:
    labels = names.labels(role.value)
    objs: list[Obj] = [_service(names.role(role), labels, [("http", HTTP_PORT), ("grpc", GRPC_PORT),
                                                           ("metrics", METRICS_PORT), ("kv", KV_PORT)],
                                headless=True)]
    if group.nodes:
        for i, nodes in enumerate(group.nodes):
            objs.append(_statefulset(names, role, group, dep, opts, index=i, node=nodes[0]))
    else:
        objs.append(_statefulset(names, role, group, dep, opts, index=None, node=None))
    objs.append(_pdb(names.role(role), labels))
    return objs


def _statefulset(names: ObjectNames, role: Role, group: ServerGroup, dep: Deployment, opts: K8sOptions,
                 index: int | None, node: str | None) -> Obj:
    """Pods of `role`: all instances (index None, ordinal = instance), or instance `index` pinned to `node`."""
    labels = names.labels(role.value)
    pod_labels = dict(labels)
    if index is not None:
        pod_labels["trt-disagg.io/instance-id"] = instance_id(role, index)
    spec: Obj = {"containers": [_instance_container(names, role, group, index)],
                 "volumes": [{"name": "config", "configMap": {"name": names.config}},
                             {"name": "engines", "persistentVolumeClaim": {
                                 "claimName": opts.engines_claim or f"{names.base}-engines", "readOnly": True}}],
                 "terminationGracePeriodSeconds": 60}
    if node is not None:
        spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": NODE_LABEL, "operator": "In", "values": [node]}]}]}}}
    name = names.role(role) if index is None else f"{names.role(role)}-{index}"
    return {"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": name, "labels": pod_labels},
            "spec": {"serviceName": names.role(role), "replicas": group.num_instances if index is None else 1,
                     "podManagementPolicy": "Parallel", "selector": {"matchLabels": pod_labels},
                     "template": {"metadata": {"labels": pod_labels}, "spec": spec}}}


def _resources(group: ServerGroup) -> Obj:
    """GPUs for a TensorRT-LLM group or a python group on CUDA (one per rank), else CPU cores."""
    if group.backend == "tensorrtllm" or group.device.startswith("cuda"):
        gpus = group.world_size
        return {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus}}
    cpus = str(group.threads_per_instance * group.world_size)
    return {"requests": {"cpu": cpus, "memory": "4Gi"}, "limits": {"cpu": cpus}}


def _instance_container(names: ObjectNames, role: Role, group: ServerGroup, index: int | None) -> Obj:
    which = "$(INSTANCE_INDEX)" if index is None else str(index)
    env: list[Obj] = []
    if index is None:
        env.append({"name": "INSTANCE_INDEX", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}}})
    env += [
        _secret_env(names, SECRET_ENV, "kv-secret"),
        _secret_env(names, "REDIS_PASSWORD", "redis-password"),
        {"name": "REDIS_URL", "value": names.redis_url},
        # A pod's address is unknown when this is written: listening on all of its interfaces is configured
        # here, explicitly; the pod network (and the Secret's keys) decide who may talk to it.
        {"name": BIND_HOST_ENV, "value": "0.0.0.0"},
        {"name": PORT_ENVS["http"], "value": str(HTTP_PORT)},
        {"name": PORT_ENVS["metrics"], "value": str(METRICS_PORT)},
        {"name": PORT_ENVS["kv"], "value": str(KV_PORT)},
    ]
    health = {"port": HTTP_PORT}
    return {
        "name": role.value, "image": names.image,
        "command": ["trt-disagg", "serve", f"{CONFIG_MOUNT}/deployment.yaml", "--instance", f"{role.value}:{which}"],
        "env": env,
        "ports": [{"name": "http", "containerPort": HTTP_PORT}, {"name": "grpc", "containerPort": GRPC_PORT},
                  {"name": "metrics", "containerPort": METRICS_PORT}, {"name": "kv", "containerPort": KV_PORT}],
        # Triton's health API: live once the server runs, ready once the model is loaded. Engines take
        # minutes to load, so a startup probe holds the liveness probe off until the server is live.
        "startupProbe": {"httpGet": {"path": "/v2/health/live", **health}, "periodSeconds": 10,
                         "failureThreshold": 90},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", **health}, "periodSeconds": 10,
                          "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", **health}, "periodSeconds": 5,
                           "failureThreshold": 2},
        "resources": _resources(group),
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
                         {"name": "engines", "mountPath": ENGINES_MOUNT, "readOnly": True}],
    }



def autoscaler_rbac(names: ObjectNames) -> list[Obj]:
    """What `trt-disagg autoscale --k8s` may do, and nothing more: read and scale the prefill and decode
    StatefulSets (`kubectl scale --current-replicas` reads the scale and updates it) and read the ConfigMap
    (how many instances it lists). Bound to a ServiceAccount for a controller run inside the cluster; an
    operator running it outside binds the Role to their own user or group instead."""
    labels = names.labels("autoscaler")
    name = f"{names.base}-autoscaler"
    statefulsets = [names.role(r) for r in SCALABLE_ROLES]
    rules = [
        {"apiGroups": ["apps"], "resources": ["statefulsets"], "resourceNames": statefulsets, "verbs": ["get"]},
        {"apiGroups": ["apps"], "resources": ["statefulsets/scale"], "resourceNames": statefulsets,
         "verbs": ["get", "patch", "update"]},
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [names.config], "verbs": ["get"]},
    ]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "labels": labels}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name, "labels": labels},
         "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": name, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name}]},
    ]


def without_password(url: str) -> str:
    """`url` with any user:password removed (a ConfigMap is readable by anyone who can read the namespace)."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _router(names: ObjectNames, dep: Deployment, opts: K8sOptions) -> list[Obj]:
    """Routers are stateless apart from their id (records in Redis): a Deployment, any number of replicas."""
    labels = names.labels("router")
    port = dep.router.port or 8000
    container = {
        "name": "router", "image": names.image,
        # --redis-url comes from REDIS_URL (not argv, where the password would show in `ps`).
        "command": ["python", "-m", "router", f"{CONFIG_MOUNT}/deployment.yaml", "--port", str(port),
                    "--router-id", "$(POD_NAME)"],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                _secret_env(names, "REDIS_PASSWORD", "redis-password"),
                {"name": "REDIS_URL", "value": names.redis_url},
                _secret_env(names, ADMIN_TOKEN_ENV, "admin-token")],
        "ports": [{"name": "http", "containerPort": port}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": port}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/health", "port": port}, "periodSeconds": 10,
                          "failureThreshold": 6},
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
                         {"name": "engines", "mountPath": ENGINES_MOUNT, "readOnly": True}],
    }
    pod_spec = {"containers": [container], "terminationGracePeriodSeconds": 30,
                "volumes": [{"name": "config", "configMap": {"name": names.config}},
                            {"name": "engines", "persistentVolumeClaim": {
                                "claimName": opts.engines_claim or f"{names.base}-engines", "readOnly": True}}]}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": {"name": names.router, "labels": labels},
                  "spec": {"replicas": opts.router_replicas, "selector": {"matchLabels": labels},
                           "template": {"metadata": {"labels": labels}, "spec": pod_spec}}}
    service = _service(names.router, labels, [("http", port)])
    return [deployment, service, _pdb(names.router, labels)]
