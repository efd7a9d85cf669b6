"""`trt-disagg autoscale`: the controller against a running deployment's Redis.

    --dry-run   read the workload and the shape, decide, record and print the decision; change nothing
    --once      one interval, then exit (otherwise every --interval until interrupted)

Acting on processes is `trt-disagg serve --autoscale`'s job (it owns them); alone, this command decides and
records only, so it may run anywhere that reaches the Redis.
"""

from __future__ import annotations

import asyncio
import json
import os

import typer

from trt_disagg.errors import UserError

Opt = typer.Option


def register(app: typer.Typer) -> None:
    """Add `autoscale` to the CLI."""
    app.command("autoscale")(autoscale_cmd)


def autoscale_cmd(
    model: str = Opt(..., help="model name or config.json (for the latency model)"),
    ttft: float = Opt(..., help="TTFT SLO, seconds"),
    tpot: float = Opt(..., help="TPOT SLO, seconds"),
    attainment: float = Opt(0.9),
    gpu: str = Opt("a100-80g"),
    prefill: str = Opt("1", help="prefill instance TPxPP"),
    decode: str = Opt("1", help="decode instance TPxPP"),
    coefficients: list[str] = Opt(None, help="profile JSON(s) from `trt-disagg profile` (one per TP degree)"),
    redis_url: str = Opt(None, help="the deployment's Redis (default: $REDIS_URL)"),
    max_instances: int = Opt(3, help="instances in all (the budget)"),
    interval_s: float = Opt(30.0),
    cooldown_s: float = Opt(90.0),
    window_s: float = Opt(None, help="observe the last N seconds (default: max(interval, 120))"),
    dry_run: bool = Opt(False, "--dry-run", help="decide and record, change nothing"),
    once: bool = Opt(False, "--once", help="one interval, then exit"),
    metrics_port: int = Opt(None, help="serve /metrics on this port"),
) -> None:
    """Decide the prefill:decode shape from the observed workload (see trt_disagg.controller)."""
    from trt_disagg.controller.policy import Budget, Controller, ControllerConfig
    from trt_disagg.controller.predict import SLO, SimPredictor
    from trt_disagg.planner.inputs import parse_parallel
    from trt_disagg.planner.placement import Placement
    from trt_disagg.planner.request import PlanRequest, plan_inputs
    from trt_disagg.planner.search import spec_for
    from trt_disagg.sim import DisaggSpec

    if not dry_run:
        raise UserError("--dry-run is required here: enacting changes is `trt-disagg serve --autoscale`'s job")
    url = redis_url or os.environ.get("REDIS_URL")
    if not url:
        raise UserError("--redis-url (or $REDIS_URL): the deployment's Redis is needed")
    inp = plan_inputs(PlanRequest(model=model, ttft_s=ttft, tpot_s=tpot, attainment=attainment, gpu=gpu,
                                  workload="fixed", input_len=64, output_len=16, num_requests=10,
                                  coefficients=tuple(coefficients or ())))
    p_cfg, d_cfg = parse_parallel(prefill, gpu, "--prefill"), parse_parallel(decode, gpu, "--decode")
    base = spec_for(inp, Placement(p_cfg, d_cfg, 1, 1))
    assert isinstance(base, DisaggSpec)
    config = ControllerConfig(interval_s=interval_s, cooldown_s=cooldown_s, target=attainment,
                              window_s=window_s if window_s is not None else max(120.0, interval_s))
    budget = Budget(max_instances, p_cfg.num_gpus, d_cfg.num_gpus)
    controller = Controller(config, budget, SimPredictor(base, SLO(ttft, tpot), horizon_s=max(4 * interval_s, 120)))
    asyncio.run(_run(url, controller, once, metrics_port))


async def _run(url: str, controller: object, once: bool, metrics_port: int | None) -> None:
    import redis.asyncio as aioredis

    from trt_disagg.controller.actuator import DryRunActuator
    from trt_disagg.controller.live import ControllerLoop, LoopSettings, read_shape
    from trt_disagg.controller.metrics import ControllerMetrics
    from trt_disagg.controller.policy import Controller

    assert isinstance(controller, Controller)
    metrics = ControllerMetrics()
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, registry=metrics.registry)

    def show(decision: object) -> None:
        from trt_disagg.controller.policy import Decision

        assert isinstance(decision, Decision)
        metrics.observe(decision)
        typer.echo(json.dumps(decision.to_json()))

    client = aioredis.from_url(url)
    try:
        actuator = DryRunActuator(await read_shape(client))
        loop = ControllerLoop(client, controller, actuator, LoopSettings(dry_run=True), on_decision=show)
        if once:
            await loop.step()
        else:
            await loop.run(asyncio.Event())
    finally:
        await client.aclose()
