"""`trt-disagg autoscale`: the controller against a running deployment's Redis.

    --dry-run   read the workload and the shape, decide, record and print the decision; change nothing
    --k8s       the same decisions, enacted on Kubernetes: replica counts of the deployment's prefill and
                decode StatefulSets (controller/k8s_actuator.py), named from --config as `render --k8s`
                named them; needs a kubectl whose context reaches the cluster (RBAC: 40-autoscaler.yaml)
    --once      one interval, then exit (with --k8s, after the change it started has taken effect)

Exactly one of --dry-run and --k8s. Acting on local processes is `trt-disagg serve --autoscale`'s job (it owns
them); --dry-run decides and records only, so it may run anywhere that reaches the Redis.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from trt_disagg.errors import UserError

log = logging.getLogger(__name__)

Opt = typer.Option
PROGRESS_POLL_S = 2.0  # how often a change in progress is advanced (a new pod registered, a drain finished)


def register(app: typer.Typer) -> None:
    """Add `autoscale` to the CLI."""
    app.command("autoscale")(autoscale_cmd)


@dataclass(frozen=True)
class K8sArgs:
    """Where and how `--k8s` acts (None: the config's `autoscale:` value if it sets one, else Timeouts')."""

    config: Path
    namespace: str | None
    kubectl: str
    startup_timeout_s: float | None
    drain_timeout_s: float | None


def autoscale_cmd(
    model: str = Opt(None, help="model name or config.json (for the latency model; default: --config's "
                     "`autoscale:` section decides everything)"),
    ttft: float = Opt(None, help="TTFT SLO, seconds (default: --config's slo.ttft_s)"),
    tpot: float = Opt(None, help="TPOT SLO, seconds (default: --config's slo.tpot_s)"),
    attainment: float = Opt(0.9),
    gpu: str = Opt(None, help="GPU type (default: --config's prefill `gpu`, else a100-80g)"),
    prefill: str = Opt(None, help="prefill instance TPxPP (default: --config's, else 1)"),
    decode: str = Opt(None, help="decode instance TPxPP (default: --config's, else 1)"),
    coefficients: list[str] = Opt(None, help="profile JSON(s) from `trt-disagg profile` (one per TP degree)"),
    redis_url: str = Opt(None, help="the deployment's Redis (default: $REDIS_URL)"),
    max_instances: int = Opt(3, help="instances in all (the budget)"),
    interval_s: float = Opt(30.0),
    cooldown_s: float = Opt(90.0),
    window_s: float = Opt(None, help="observe the last N seconds (default: max(interval, 120))"),
    dry_run: bool = Opt(False, "--dry-run", help="decide and record, change nothing"),
    k8s: bool = Opt(False, "--k8s", help="act: scale the prefill and decode StatefulSets (needs --config)"),
    config: Path = Opt(None, "--config", help="the deployment YAML (its object names on Kubernetes; defaults)"),
    namespace: str = Opt(None, help="--k8s: the deployment's namespace (default: the kubectl context's)"),
    kubectl: str = Opt(None, help="--k8s: the kubectl to run (default: kubectl on PATH)"),
    startup_timeout_s: float = Opt(None, help="--k8s: a new instance must register within this (default 1200)"),
    drain_timeout_s: float = Opt(None, help="--k8s: a drained instance is removed after this even if busy "
                                 "(default 300)"),
    once: bool = Opt(False, "--once", help="one interval, then exit"),
    metrics_port: int = Opt(None, help="serve /metrics on this port"),
) -> None:
    """Decide the prefill:decode shape from the observed workload (see trt_disagg.controller)."""
    from trt_disagg.config import load_deployment

    k8s_args = _check_mode(dry_run, k8s, config, namespace, kubectl, startup_timeout_s, drain_timeout_s)
    url = redis_url or os.environ.get("REDIS_URL")
    if not url:
        raise UserError("--redis-url (or $REDIS_URL): the deployment's Redis is needed")
    dep = load_deployment(config) if config is not None else None
    if model is None:
        if dep is None:
            raise UserError("--model (the latency model's), or --config whose `autoscale:` section says it")
        from trt_disagg.controller.from_deployment import build_autoscale

        controller = build_autoscale(dep).controller
    else:
        flags = Flags(model, ttft, tpot, attainment, gpu, prefill, decode, tuple(coefficients or ()), max_instances,
                      interval_s, cooldown_s, window_s)
        controller = _controller_from_flags(flags, dep)
    asyncio.run(_run(url, controller, once, metrics_port, k8s_args))


@dataclass(frozen=True)
class Flags:
    """The controller as the flags describe it (None: --config's value)."""

    model: str
    ttft: float | None
    tpot: float | None
    attainment: float
    gpu: str | None
    prefill: str | None
    decode: str | None
    coefficients: tuple[str, ...]
    max_instances: int
    interval_s: float
    cooldown_s: float
    window_s: float | None


def _controller_from_flags(f: Flags, dep: Any) -> Any:
    from trt_disagg.controller.policy import Budget, Controller, ControllerConfig
    from trt_disagg.controller.predict import SLO, SimPredictor
    from trt_disagg.planner.inputs import parse_parallel
    from trt_disagg.planner.placement import Placement
    from trt_disagg.planner.request import PlanRequest, plan_inputs
    from trt_disagg.planner.search import spec_for
    from trt_disagg.sim import DisaggSpec

    d = _defaults(dep)
    ttft, tpot = f.ttft if f.ttft is not None else d["ttft"], f.tpot if f.tpot is not None else d["tpot"]
    if ttft is None or tpot is None:
        raise UserError("--ttft and --tpot (or --config, whose slo gives them) are needed")
    gpu = f.gpu or d["gpu"] or "a100-80g"
    inp = plan_inputs(PlanRequest(model=f.model, ttft_s=ttft, tpot_s=tpot, attainment=f.attainment, gpu=gpu,
                                  workload="fixed", input_len=64, output_len=16, num_requests=10,
                                  coefficients=f.coefficients))
    p_cfg = parse_parallel(f.prefill or d["prefill"] or "1", gpu, "--prefill")
    d_cfg = parse_parallel(f.decode or d["decode"] or "1", gpu, "--decode")
    base = spec_for(inp, Placement(p_cfg, d_cfg, 1, 1))
    assert isinstance(base, DisaggSpec)
    cfg = ControllerConfig(interval_s=f.interval_s, cooldown_s=f.cooldown_s, target=f.attainment,
                           window_s=f.window_s if f.window_s is not None else max(120.0, f.interval_s))
    budget = Budget(f.max_instances, p_cfg.num_gpus, d_cfg.num_gpus)
    return Controller(cfg, budget, SimPredictor(base, SLO(ttft, tpot), horizon_s=max(4 * f.interval_s, 120)))


def _check_mode(dry_run: bool, k8s: bool, config: Path | None, namespace: str | None, kubectl: str | None,
                startup_timeout_s: float | None, drain_timeout_s: float | None) -> K8sArgs | None:
    """Exactly one of --dry-run and --k8s; the --k8s options only with --k8s. None: a dry run."""
    if dry_run == k8s:
        raise UserError("choose one of --dry-run (decide and record, change nothing) and --k8s (scale the "
                        "deployment's StatefulSets); acting on local processes is `trt-disagg serve --autoscale`")
    if dry_run:
        given = [flag for flag, v in (("--namespace", namespace), ("--kubectl", kubectl),
                                      ("--startup-timeout-s", startup_timeout_s),
                                      ("--drain-timeout-s", drain_timeout_s)) if v is not None]
        if given:
            raise UserError(f"{', '.join(given)}: only with --k8s")
        return None
    if config is None:
        raise UserError("--k8s needs --config: the deployment YAML `render --k8s` was given (it names the "
                        "StatefulSets and the ConfigMap)")
    for flag, value in (("--startup-timeout-s", startup_timeout_s), ("--drain-timeout-s", drain_timeout_s)):
        if value is not None and value <= 0:
            raise UserError(f"{flag} must be > 0, got {value}")
    return K8sArgs(config, namespace, kubectl or "kubectl", startup_timeout_s, drain_timeout_s)


def _defaults(dep: Any) -> dict[str, Any]:
    """What --config says about the SLO, the GPU and each role's TP x PP (flags win)."""
    if dep is None:
        return {"ttft": None, "tpot": None, "gpu": None, "prefill": None, "decode": None}
    p, d = dep.context_servers, dep.generation_servers
    return {"ttft": dep.slo.ttft_s, "tpot": dep.slo.tpot_s, "gpu": p.gpu if p is not None else None,
            "prefill": f"{p.tp}x{p.pp}" if p is not None else None,
            "decode": f"{d.tp}x{d.pp}" if d is not None else None}


def _timeouts(args: K8sArgs, dep: Any) -> Any:
    """Flags win; then what the config's `autoscale:` section sets explicitly; then the Kubernetes defaults
    (longer than a local process's: a pod is scheduled and its image pulled before the engine loads)."""
    from trt_disagg.controller.k8s_actuator import Timeouts

    section = dep.autoscale
    explicit = section.model_fields_set if section is not None else set()
    default = Timeouts()

    def pick(flag: float | None, name: str, fallback: float) -> float:
        if flag is not None:
            return flag
        return float(getattr(section, name)) if name in explicit else fallback

    return Timeouts(startup_s=pick(args.startup_timeout_s, "startup_timeout_s", default.startup_s),
                    drain_s=pick(args.drain_timeout_s, "drain_timeout_s", default.drain_s))


def _k8s_actuator(args: K8sArgs, redis_url: str, max_instances: int) -> Any:
    """Connect to the cluster (replica counts, the ConfigMap's capacity); kubectl failures become UserErrors."""
    import redis as sync_redis

    from trt_disagg.config import load_deployment
    from trt_disagg.controller.k8s_actuator import Kubectl, KubectlError, KubernetesActuator

    dep = load_deployment(args.config)
    client = sync_redis.Redis.from_url(redis_url)
    try:
        actuator = KubernetesActuator.connect(dep, Kubectl(args.kubectl, args.namespace), client,
                                              _timeouts(args, dep))
    except (KubectlError, UserError) as exc:
        client.close()
        if isinstance(exc, UserError):
            raise
        raise UserError(f"--k8s: cannot read the deployment from the cluster: {exc}") from None
    short = {r.value: n for r, n in actuator.capacity.items() if n < max_instances - 1}
    if short:
        typer.echo(f"warning: configmap/{actuator.target.config_map} lists fewer instances than a budget of "
                   f"{max_instances} can need ({short}); the controller will not grow those roles past that",
                   err=True)
    return actuator


async def _run(url: str, controller: object, once: bool, metrics_port: int | None, k8s: K8sArgs | None) -> None:
    import redis.asyncio as aioredis

    from trt_disagg.controller.actuator import Actuator, DryRunActuator
    from trt_disagg.controller.live import ControllerLoop, LoopSettings, read_shape
    from trt_disagg.controller.metrics import ControllerMetrics
    from trt_disagg.controller.policy import Controller, Decision

    assert isinstance(controller, Controller)
    metrics = ControllerMetrics()
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, registry=metrics.registry)

    def show(decision: Decision) -> None:
        metrics.observe(decision)
        typer.echo(json.dumps(decision.to_json()))

    client = aioredis.from_url(url)
    actuator: Actuator | None = None
    try:
        if k8s is None:
            actuator = DryRunActuator(await read_shape(client))
        else:
            actuator = _k8s_actuator(k8s, url, controller.budget.max_instances)
        loop = ControllerLoop(client, controller, actuator, LoopSettings(dry_run=k8s is None), on_decision=show)
        stop = asyncio.Event()
        if once:
            await loop.step()
            stop.set()
        progress = asyncio.create_task(_advance_changes(actuator, stop))
        try:
            if not once:
                await loop.run(stop)
        finally:
            await progress
    finally:
        left = getattr(actuator, "in_progress", lambda: None)()
        if left is not None:
            typer.echo(f"warning: stopped while {left}: check `kubectl get statefulsets` and /admin/instances "
                       "(a drain mark may need /admin/instances/ID/undrain)", err=True)
        await client.aclose()
        redis_client = getattr(actuator, "redis", None)
        if redis_client is not None:
            redis_client.close()


async def _advance_changes(actuator: Any, stop: asyncio.Event) -> None:
    """Poll a change in progress more often than the controller decides, so a drained instance goes as soon
    as it is idle; after `stop`, finish the change that was started (a half-done scale would leave a drained
    instance out of service, or a new pod unwatched)."""
    from trt_disagg.controller.live import REDIS_ERRORS

    while True:
        try:
            busy = actuator.busy(time.time())
        except REDIS_ERRORS as exc:  # the controller's loop backs off and says so; keep polling meanwhile
            log.debug("advancing the change in progress: Redis unreachable (%s)", exc)
            busy = True
        if stop.is_set() and not busy:
            return
        if stop.is_set():
            await asyncio.sleep(PROGRESS_POLL_S)  # polling the cluster: nothing to wake us earlier
            continue
        try:
            await asyncio.wait_for(stop.wait(), PROGRESS_POLL_S)
        except TimeoutError:
            pass
