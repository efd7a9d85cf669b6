"""The controller a deployment YAML asks for: its `autoscale:` section, its SLO, its instances' timings.

    deployment.autoscale ─▶ ControllerConfig (interval, cooldown, window, target = slo.attainment)
                         ─▶ Budget (max_instances, per-role minimum, GPUs per instance from TP x PP)
                         ─▶ SimPredictor on a DisaggSpec: how fast one instance of each role is
    the DisaggSpec, python backend:       profile JSON(s) from `trt-disagg profile` + each role's built
                                          engine (hidden size, dtype, KV capacity) + the group's limits
    the DisaggSpec, tensorrtllm backend:  the planner's latency model (profile JSON, else published or
                                          roofline) of `autoscale.model` on each group's `gpu:`; an instance
                                          whose GPUs cannot hold the weights is a UserError naming the field

No process is started here: `serve --autoscale` builds the controller first, so a config that cannot be
autoscaled fails (exit 2) before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trt_disagg.config import AutoscaleConfig, Deployment, ServerGroup
from trt_disagg.contract import Role
from trt_disagg.controller.local_actuator import ActuatorSettings
from trt_disagg.controller.policy import Budget, Controller, ControllerConfig
from trt_disagg.controller.predict import SLO, SimPredictor
from trt_disagg.errors import UserError
from trt_disagg.sim import DisaggSpec

# KV hand-off between two processes on one host (DESIGN.md: /dev/shm ~6 GiB/s, sockets ~3-4 GiB/s).
LOCAL_KV_LINK_BYTES_PER_S = 3 * 2**30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1}
FIELD = {Role.PREFILL: "context_servers", Role.DECODE: "generation_servers"}


@dataclass(frozen=True)
class AutoscaleSetup:
    controller: Controller
    actuator: ActuatorSettings


def autoscale_section(dep: Deployment) -> AutoscaleConfig:
    """The config's section, or the defaults when `--autoscale` turns on a config without one."""
    if dep.context_servers is None or dep.generation_servers is None:
        raise UserError("--autoscale: the deployment needs context_servers and generation_servers")
    return dep.autoscale if dep.autoscale is not None else AutoscaleConfig()


def build_autoscale(dep: Deployment, engines_root: Path | None = None) -> AutoscaleSetup:
    """Controller (with its predictor) and actuator settings for `dep`; UserError naming the field."""
    auto = autoscale_section(dep)
    groups = _groups(dep)
    spec = latency_spec(dep, auto, engines_root)
    config = ControllerConfig(interval_s=auto.interval_s, cooldown_s=auto.cooldown_s, target=dep.slo.attainment,
                              window_s=auto.window_s, min_requests=auto.min_requests)
    p, d = groups[Role.PREFILL], groups[Role.DECODE]
    budget = Budget(dep.autoscale_budget(), p.world_size, d.world_size, min_prefill=auto.min_prefill,
                    min_decode=auto.min_decode)
    predictor = SimPredictor(spec, SLO(dep.slo.ttft_s, dep.slo.tpot_s), horizon_s=max(4 * auto.interval_s, 120.0))
    settings = ActuatorSettings(auto.drain_timeout_s, auto.startup_timeout_s, auto.min_prefill, auto.min_decode)
    return AutoscaleSetup(Controller(config, budget, predictor), settings)


def _groups(dep: Deployment) -> dict[Role, ServerGroup]:
    groups = dep.groups()
    return {Role.PREFILL: groups[Role.PREFILL], Role.DECODE: groups[Role.DECODE]}


def _profiles(auto: AutoscaleConfig) -> list[str]:
    return [auto.profile] if isinstance(auto.profile, str) else list(auto.profile or [])


def latency_spec(dep: Deployment, auto: AutoscaleConfig, engines_root: Path | None) -> DisaggSpec:
    """One prefill and one decode instance's timings (the predictor replaces the counts per shape)."""
    groups = _groups(dep)
    if all(g.backend == "python" for g in groups.values()):
        return _python_spec(dep, auto, engines_root)
    return _planner_spec(dep, auto)


def _python_spec(dep: Deployment, auto: AutoscaleConfig, engines_root: Path | None) -> DisaggSpec:
    """The CPU engine: the profiled latency model, each role's built engine and limits."""
    from trt_disagg.engine_dir import EngineConfig
    from trt_disagg.planner.latency_model import InstanceTiming, LatencyModel
    from trt_disagg.sim import InstanceSpec

    files = _profiles(auto)
    if not files:
        raise UserError("autoscale.profile: the controller predicts with the engine's latency model; profile "
                        "it (`trt-disagg profile`) and give the JSON here")
    models = [LatencyModel.from_json(f) for f in files]
    by_tp = {tp: c for m in models for tp, c in m.by_tp.items()}
    specs: dict[Role, InstanceSpec] = {}
    for role, group in _groups(dep).items():
        engine_dir = dep.engine_dir(role, engines_root)
        try:
            cfg = EngineConfig.load(engine_dir)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"autoscale: the {role.value} engine ({engine_dir}) is needed for its timings: "
                            f"{exc} (build it with `trt-disagg build CONFIG`)") from None
        if group.tp not in by_tp:
            raise UserError(f"autoscale.profile: no latency coefficients for TP {group.tp} ({FIELD[role]}."
                            f"tensor_parallel_size); profiled: TP {sorted(by_tp)}")
        timing = InstanceTiming(by_tp[group.tp], group.pp, cfg.shape.hidden_size, LOCAL_KV_LINK_BYTES_PER_S,
                                DTYPE_BYTES[cfg.dtype])
        specs[role] = InstanceSpec(timing, cfg.kv_cache.max_tokens, group.max_batch_size, group.max_num_tokens)
    cfg = EngineConfig.load(dep.engine_dir(Role.PREFILL, engines_root))
    return DisaggSpec(specs[Role.PREFILL], specs[Role.DECODE], 1, 1,
                      cfg.shape.kv_bytes_per_token(DTYPE_BYTES[cfg.kv_cache.dtype]), LOCAL_KV_LINK_BYTES_PER_S)


def _planner_spec(dep: Deployment, auto: AutoscaleConfig) -> DisaggSpec:
    """GPU groups: the planner's instance specs (its memory model refuses an instance that cannot hold the
    weights), as `trt-disagg plan` would simulate them."""
    from trt_disagg.planner.hardware import get_gpu
    from trt_disagg.planner.memory import kv_capacity_tokens
    from trt_disagg.planner.models import get_model
    from trt_disagg.planner.placement import ParallelConfig, Placement
    from trt_disagg.planner.request import PlanRequest, plan_inputs
    from trt_disagg.planner.search import spec_for

    if auto.model is None:
        raise UserError("autoscale.model: tensorrtllm groups need the model the latency model is for "
                        "(a planner model name or a config.json)")
    groups = _groups(dep)
    configs = {}
    for role, group in groups.items():
        if group.gpu is None:
            raise UserError(f"{FIELD[role]}.gpu: the autoscaler needs the GPU type (e.g. h100-sxm) for the "
                            "latency model")
        gpu = get_gpu(group.gpu)
        model = get_model(auto.model)
        if kv_capacity_tokens(model, gpu, group.tp, group.pp) is None:
            raise UserError(f"{FIELD[role]}: {group.tp}x{group.pp} {gpu.name} GPU(s) per instance cannot hold "
                            f"{model.name}'s weights ({model.weight_bytes / 1e9:.0f} GB) and a KV cache")
        configs[role] = ParallelConfig(gpu.name, group.tp, group.pp)
    gpu_names = sorted({c.gpu for c in configs.values()})
    inp = plan_inputs(PlanRequest(model=auto.model, ttft_s=dep.slo.ttft_s, tpot_s=dep.slo.tpot_s,
                                  attainment=dep.slo.attainment, pools=tuple(f"{g}:1x8" for g in gpu_names),
                                  workload="fixed", input_len=64, output_len=16, num_requests=10,
                                  coefficients=tuple(_profiles(auto))))
    spec = spec_for(inp, Placement(configs[Role.PREFILL], configs[Role.DECODE], 1, 1))
    assert isinstance(spec, DisaggSpec)
    return spec
