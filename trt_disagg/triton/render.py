"""`trt-disagg render`: one Triton model repository per instance, from model_repo/ templates.

    <out>/<instance id>/            e.g. out/prefill-0, out/decode-0, out/colocated-0
      <model name>/config.pbtxt      model_repo/<backend>/<role>/config.pbtxt with ${...} filled in
      <model name>/1/model.py        python backend: model_repo/python/common/model.py
      instance.json                  what `serve` needs: role, backend, engine dir, environment

The model is named after its role ("prefill", "decode", "colocated"); the router reads the name from the
registry (InstanceInfo.model_name). GPU ids: instances take consecutive devices of a node in config
order (prefill first), `participant_ids` number the executor ranks the same way (TensorRT-LLM
orchestrator mode: rank 0 is the orchestrator, so participants start at 1).
"""

from __future__ import annotations

import json
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

from trt_disagg.config import Deployment, ServerGroup
from trt_disagg.contract import Role
from trt_disagg.engine_build.xgrammar_info import XGRAMMAR_TOKENIZER_INFO
from trt_disagg.engine_dir import tokenizer_dir
from trt_disagg.errors import UserError

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "model_repo"
ROLE_FIELD = {Role.PREFILL: "context_servers", Role.DECODE: "generation_servers",
              Role.COLOCATED: "colocated_servers"}
TRTLLM_TRANSCEIVER_ENV = {"UCX": "TRTLLM_USE_UCX_KVCACHE", "NIXL": "TRTLLM_USE_NIXL_KVCACHE",
                          "MPI": "TRTLLM_USE_MPI_KVCACHE"}
PYTHON_TRANSPORTS = ("auto", "shm", "tcp")


@dataclass(frozen=True)
class InstancePlan:
    """One instance of a deployment: what to render and how to start it."""

    instance_id: str  # "<role>-<n>"
    role: Role
    index: int
    group: ServerGroup
    engine_dir: Path
    gpu_device_ids: tuple[int, ...]
    participant_ids: tuple[int, ...]

    @property
    def backend(self) -> str:
        return self.group.backend

    @property
    def model_name(self) -> str:
        return self.role.value

    @property
    def url(self) -> str | None:
        """host:port from the group's `urls` (multi-host), else None (ports picked on this host)."""
        return self.group.urls[self.index] if self.group.urls else None

    def env(self) -> dict[str, str]:
        """Environment the instance's tritonserver needs beyond ports and secrets."""
        if self.backend != "tensorrtllm":
            return {}
        backend = self.group.cache_transceiver_config.backend
        var = TRTLLM_TRANSCEIVER_ENV.get(backend, TRTLLM_TRANSCEIVER_ENV["UCX"])
        return {var: "1"} if self.role is not Role.COLOCATED else {}


def plan_instances(dep: Deployment, engines_root: Path | None = None) -> list[InstancePlan]:
    """Every instance of the deployment, prefill first, with its engine dir and device ids."""
    plans: list[InstancePlan] = []
    next_gpu, next_participant = 0, 1
    for role, group in dep.groups().items():
        _check_group(role, group)
        engine_dir = dep.engine_dir(role, engines_root).resolve()
        for n in range(group.num_instances):
            world = group.world_size
            gpus = tuple((next_gpu + i) % group.gpus_per_node for i in range(world))
            parts = tuple(range(next_participant, next_participant + world))
            next_gpu += world
            next_participant += world
            plans.append(InstancePlan(f"{role.value}-{n}", role, n, group, engine_dir, gpus, parts))
    return plans


def _check_group(role: Role, group: ServerGroup) -> None:
    backend = group.cache_transceiver_config.backend
    field = f"{ROLE_FIELD[role]}.cache_transceiver_config.backend"
    if group.backend == "python" and backend not in PYTHON_TRANSPORTS:
        raise UserError(f"{field}: {backend} needs the tensorrtllm backend; the python backend moves KV "
                        f"with {', '.join(PYTHON_TRANSPORTS)}")
    if group.backend == "tensorrtllm" and backend in ("shm", "tcp"):
        raise UserError(f"{field}: {backend} is a python-backend transport; TensorRT-LLM uses UCX, NIXL or MPI")


def check_devices(dep: Deployment, roles: set[Role] | None = None) -> None:
    """UserError naming `<group>.device` when a python group (of `roles`; None: all) asks for a CUDA device
    this host does not have. torch is imported only when some group asks for one: a CPU deployment's serve
    stays torch-free here."""
    for role, group in dep.groups().items():
        if group.backend != "python" or group.device == "cpu" or (roles is not None and role not in roles):
            continue
        from trt_disagg.engine.device import check_device

        check_device(group.device, group.world_size, f"{ROLE_FIELD[role]}.device")


def template_values(plan: InstancePlan, decoupled: bool = True) -> dict[str, str]:
    """Placeholders of the templates. Prefill answers once, so it is never decoupled (unary infer works)."""
    g = plan.group
    kv = g.kv_cache_config
    ct = g.cache_transceiver_config
    return {
        "model_name": plan.model_name,
        "decoupled": "true" if decoupled and plan.role is not Role.PREFILL else "false",
        "max_batch_size": str(g.max_batch_size),
        "engine_dir": str(plan.engine_dir),
        "kv_transport": ct.backend,
        "handle_ttl_s": repr(float(ct.handle_ttl_s)),
        "max_pending_tokens": "" if ct.max_pending_tokens is None else str(ct.max_pending_tokens),
        "threads_per_rank": str(g.threads_per_instance),
        "device": g.device,
        "kv_cache_free_gpu_mem_fraction": repr(float(kv.free_gpu_memory_fraction)),
        "enable_kv_cache_reuse": "true" if kv.enable_block_reuse else "false",
        "event_buffer_max_size": str(kv.event_buffer_max_size),
        "max_tokens_in_paged_kv_cache": "" if kv.max_tokens is None else str(kv.max_tokens),
        "gpu_device_ids": ",".join(str(i) for i in plan.gpu_device_ids),
        "participant_ids": ",".join(str(i) for i in plan.participant_ids),
        "tokenizer_dir": str(tokenizer_dir(plan.engine_dir)),
        "xgrammar_tokenizer_info_path": str(Path(plan.engine_dir) / XGRAMMAR_TOKENIZER_INFO),
    }


def render_config(plan: InstancePlan, templates: Path = TEMPLATES_DIR, decoupled: bool = True) -> str:
    path = templates / plan.backend / plan.role.value / "config.pbtxt"
    if not path.is_file():
        raise UserError(f"model template {path} not found (is model_repo/ next to the trt_disagg package?)")
    try:
        return string.Template(path.read_text()).substitute(template_values(plan, decoupled))
    except (KeyError, ValueError) as exc:
        raise UserError(f"template {path} has an unknown placeholder: {exc}") from None


def render_instance(plan: InstancePlan, out_dir: Path, templates: Path = TEMPLATES_DIR,
                    decoupled: bool = True, url: str | None = None) -> Path:
    """Write <out_dir>/<instance id>/ (replacing an older render of it); returns that directory.

    `url` is the gRPC host:port the instance will listen on when the caller has picked it (serve does, just
    before launching), so that instance.json names where to reach it; else the group's `urls` entry.
    """
    repo = out_dir / plan.instance_id
    if repo.exists():
        shutil.rmtree(repo)
    model_dir = repo / plan.model_name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(render_config(plan, templates, decoupled))
    if plan.backend == "python":
        shutil.copyfile(templates / "python" / "common" / "model.py", model_dir / "1" / "model.py")
    (repo / "instance.json").write_text(json.dumps({
        "instance_id": plan.instance_id, "role": plan.role.value, "backend": plan.backend,
        "model_name": plan.model_name, "engine_dir": str(plan.engine_dir),
        "url": url if url is not None else plan.url,
        "tp": plan.group.tp, "pp": plan.group.pp, "gpu_device_ids": list(plan.gpu_device_ids),
        "env": plan.env(),
    }, indent=2))
    return repo


def render_deployment(dep: Deployment, out_dir: Path, engines_root: Path | None = None,
                      templates: Path = TEMPLATES_DIR, decoupled: bool = True) -> list[tuple[InstancePlan, Path]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [(p, render_instance(p, out_dir, templates, decoupled)) for p in plan_instances(dep, engines_root)]
