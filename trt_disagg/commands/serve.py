"""`trt-disagg render CONFIG -o DIR` and `trt-disagg serve CONFIG [--instance ROLE:N]`.

serve starts Redis, every instance (a tritonserver each) and the router, prints the endpoints, and on
Ctrl-C / SIGTERM stops everything (see trt_disagg/triton/cluster.py). It also stops everything, with the
reason, when an instance dies on its own.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from trt_disagg.config import load_deployment
from trt_disagg.contract import Role
from trt_disagg.errors import UserError

out = Console()
err = Console(stderr=True)


def parse_instance(spec: str) -> str:
    """"decode:1" -> "decode-1"; the message names the argument when it is malformed."""
    role, sep, index = spec.partition(":")
    try:
        if not sep:
            raise ValueError
        return f"{Role(role).value}-{int(index)}"
    except ValueError:
        raise UserError(f"--instance {spec!r}: expected ROLE:N with ROLE one of "
                        f"{', '.join(r.value for r in Role)} and N an instance index") from None


def render_cmd(
    config: Annotated[Path, typer.Argument(help="deployment YAML")],
    output: Annotated[Path, typer.Option("-o", "--output", help="directory for the model repositories")],
    engines_root: Annotated[Path | None, typer.Option("--engines-dir", help="engines directory (default: the config's)")] = None,
    decoupled: Annotated[bool, typer.Option(help="decoupled (streaming) decode/colocated models")] = True,
) -> None:
    """Write one Triton model repository per instance (engine paths filled in)."""
    from trt_disagg.triton.render import render_deployment

    dep = load_deployment(config)
    table = Table("instance", "backend", "model", "engine", "repository")
    for plan, repo in render_deployment(dep, output, engines_root, decoupled=decoupled):
        table.add_row(plan.instance_id, plan.backend, plan.model_name, str(plan.engine_dir), str(repo))
    out.print(table)


class _Stop(Exception):
    """Raised in the main thread by SIGTERM/SIGINT so that `finally` stops everything."""


def serve_cmd(
    config: Annotated[Path, typer.Argument(help="deployment YAML")],
    instance: Annotated[list[str] | None, typer.Option("--instance", help="start only ROLE:N (multi-host; "
                                                        "needs REDIS_URL); repeatable")] = None,
    engines_root: Annotated[Path | None, typer.Option("--engines-dir", help="engines directory (default: the config's)")] = None,
    router: Annotated[bool, typer.Option(help="start the router too (when the router package exists)")] = True,
    ready_timeout_s: Annotated[float, typer.Option(help="seconds an instance may take to load")] = 300.0,
    run_dir: Annotated[Path | None, typer.Option(help="keep repositories and logs here (default: a temp dir, "
                                                 "removed on stop)")] = None,
) -> None:
    """Start Redis, every instance and the router; stop them all on Ctrl-C or SIGTERM."""
    from trt_disagg.triton.cluster import LocalCluster

    logging.basicConfig(level=logging.WARNING)
    dep = load_deployment(config)
    only = [parse_instance(s) for s in instance] if instance else None
    cluster = LocalCluster(dep, config_path=config, engines_root=engines_root, only=only,
                           start_router=router and only is None, ready_timeout_s=ready_timeout_s,
                           run_dir=run_dir)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        raise _Stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.monotonic()
    try:
        with err.status(f"starting {dep.name}: Redis, {len(cluster.plans())} instance(s)..."):
            cluster.start()
        _print_endpoints(cluster, time.monotonic() - t0)
        while not stop.wait(1.0):
            dead = cluster.dead_instances()
            if dead:
                raise UserError(f"instance(s) {', '.join(dead)} exited; stopping the deployment")
    except _Stop as why:
        err.print(f"{why}: stopping {dep.name}...")
    finally:
        t1 = time.monotonic()
        for s in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not interrupt the clean-up
            signal.signal(s, signal.SIG_IGN)
        cluster.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        err.print(f"stopped in {time.monotonic() - t1:.1f}s")


def _print_endpoints(cluster: object, startup_s: float) -> None:
    from trt_disagg.triton.cluster import LocalCluster

    assert isinstance(cluster, LocalCluster)
    table = Table("instance", "model", "gRPC", "HTTP", "KV port", "log")
    for e in cluster.endpoints():
        table.add_row(e.instance_id, e.model_name, e.grpc_url, e.http_url, str(e.kv_port), str(e.log_path))
    out.print(table)
    out.print(f"Redis: {cluster.redis_url}")
    if cluster.router_url:
        out.print(f"Router: {cluster.router_url}  (OpenAI API: {cluster.router_url}/v1)")
    out.print(f"ready in {startup_s:.1f}s; Ctrl-C stops everything")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the CLI."""
    app.command("render")(render_cmd)
    app.command("serve")(serve_cmd)
