"""`trt-disagg render CONFIG -o DIR` and `trt-disagg serve CONFIG [--instance ROLE:N]`.

serve starts Redis, every instance (a tritonserver each) and the router, prints the endpoints, and on
Ctrl-C / SIGTERM stops everything (see trt_disagg/triton/cluster.py). In between it supervises
(trt_disagg/triton/supervise.py): a process that dies (an instance, the router, the embedded Redis) is
restarted with back-off and the restart logged with its reason; the deployment stops, with exit code 1
and the reason, only when a role has no instance left (or Redis or the router keeps failing).

With --autoscale (or `autoscale: {enabled: true}`), the online SLA planner runs next to the supervisor
(trt_disagg/controller/runner.py): every interval it decides the prefill:decode shape from the finished
requests, prints the decision as one `autoscale ...` line with its reason, and starts, retires or switches
one instance at a time (trt_disagg/controller/local_actuator.py). Its metrics are served on their own port
(`autoscale.metrics_port`, on the router's host), not on the router's /metrics.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from trt_disagg.config import load_deployment
from trt_disagg.contract import Role
from trt_disagg.errors import UserError

if TYPE_CHECKING:
    from trt_disagg.config import Deployment
    from trt_disagg.controller.from_deployment import AutoscaleSetup
    from trt_disagg.controller.runner import AutoscaleRunner
    from trt_disagg.triton.cluster import Endpoint, LocalCluster

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
    k8s: Annotated[bool, typer.Option("--k8s", help="write Kubernetes manifests instead (kubectl apply -f DIR)")] = False,
    image: Annotated[str | None, typer.Option(help="--k8s: container image with trt-disagg")] = None,
    engines_claim: Annotated[str | None, typer.Option(help="--k8s: PVC holding the built engines "
                                                      "(default <name>-engines)")] = None,
    max_instances_per_role: Annotated[int | None, typer.Option(
        min=1, help="--k8s: prefill/decode instances the ConfigMap lists, the most the autoscaler may scale "
        "a role to (default 8)")] = None,
) -> None:
    """Write one Triton model repository per instance (engine paths filled in), or with --k8s the manifests."""
    from trt_disagg.triton.render import render_deployment

    if k8s:
        from trt_disagg.commands.render_k8s import render_k8s_files

        return render_k8s_files(config, output, image, engines_claim, max_instances_per_role)
    dep = load_deployment(config)
    table = Table("instance", "backend", "model", "engine", "repository")
    for plan, repo in render_deployment(dep, output, engines_root, decoupled=decoupled):
        table.add_row(plan.instance_id, plan.backend, plan.model_name, str(plan.engine_dir), str(repo))
    out.print(table)


class _Stop(Exception):
    """Raised in the main thread by SIGTERM/SIGINT during start-up so that `finally` stops everything."""


EXIT_DEPLOYMENT_FAILED = 1
SUPERVISE_EVERY_S = 0.5


def serve_cmd(
    config: Annotated[Path, typer.Argument(help="deployment YAML")],
    instance: Annotated[list[str] | None, typer.Option("--instance", help="start only ROLE:N (multi-host; "
                                                        "needs REDIS_URL); repeatable")] = None,
    engines_root: Annotated[Path | None, typer.Option("--engines-dir", help="engines directory (default: the config's)")] = None,
    router: Annotated[bool, typer.Option(help="start the router too (when the router package exists)")] = True,
    ready_timeout_s: Annotated[float, typer.Option(help="seconds an instance may take to load")] = 300.0,
    run_dir: Annotated[Path | None, typer.Option(help="keep repositories and logs here (default: a temp dir, "
                                                 "removed on stop)")] = None,
    autoscale: Annotated[bool, typer.Option("--autoscale", help="run the online SLA planner: it starts, retires "
                                            "and switches instances (the config's `autoscale:` section)")] = False,
) -> None:
    """Start Redis, every instance and the router; restart what fails; stop them all on Ctrl-C or SIGTERM."""
    from trt_disagg.triton.cluster import LocalCluster
    from trt_disagg.triton.render import check_devices
    from trt_disagg.triton.supervise import DeploymentFailed, Supervisor

    logging.basicConfig(level=logging.WARNING)
    dep = load_deployment(config)
    only = [parse_instance(s) for s in instance] if instance else None
    setup = _autoscale_setup(dep, engines_root, autoscale, only)  # a bad config fails before anything starts
    runner = None
    check_devices(dep, {Role(i.rpartition("-")[0]) for i in only} if only else None)
    cluster = LocalCluster(dep, config_path=config, engines_root=engines_root, only=only,
                           start_router=router and only is None, ready_timeout_s=ready_timeout_s,
                           run_dir=run_dir)
    stop = threading.Event()
    started = threading.Event()  # from then on a signal only sets `stop`: no restart is cut in half
    got: list[str] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        got.append(signal.Signals(signum).name)
        stop.set()
        if not started.is_set():
            raise _Stop(got[-1])

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.monotonic()
    try:
        with err.status(f"starting {dep.name}: Redis, {len(cluster.plans())} instance(s)..."):
            cluster.start()
        _print_endpoints(cluster, time.monotonic() - t0)
        supervisor = Supervisor(cluster)
        if setup is not None:
            runner = _start_autoscaler(cluster, setup)
        started.set()
        while not stop.wait(SUPERVISE_EVERY_S):
            supervisor.tick()
        err.print(f"{got[-1]}: stopping {dep.name}...")
    except _Stop as why:
        err.print(f"{why}: stopping {dep.name}...")
    except DeploymentFailed as exc:
        err.print(f"[red]deployment failed:[/red] {exc}; stopping {dep.name}")
        raise typer.Exit(EXIT_DEPLOYMENT_FAILED) from None
    finally:
        t1 = time.monotonic()
        for s in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not interrupt the clean-up
            signal.signal(s, signal.SIG_IGN)
        if runner is not None:
            runner.stop()  # before the cluster: no start or retirement races the clean-up
        cluster.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        err.print(f"stopped in {time.monotonic() - t1:.1f}s")


def _autoscale_setup(dep: Deployment, engines_root: Path | None, flag: bool,
                     only: list[str] | None) -> AutoscaleSetup | None:
    """The controller when --autoscale or `autoscale.enabled` asks for one (UserError: exit 2)."""
    if not (flag or (dep.autoscale is not None and dep.autoscale.enabled)):
        return None
    if only is not None:
        raise UserError("--autoscale starts and stops instances on this host: not with --instance")
    from trt_disagg.controller.from_deployment import build_autoscale

    return build_autoscale(dep, engines_root)


def _start_autoscaler(cluster: LocalCluster, setup: AutoscaleSetup) -> AutoscaleRunner:
    """The controller's thread, acting on `cluster`; each decision printed as one line."""
    from trt_disagg.controller.from_deployment import autoscale_section
    from trt_disagg.controller.local_actuator import LocalClusterActuator
    from trt_disagg.controller.runner import AutoscaleRunner, decision_line

    port = autoscale_section(cluster.dep).metrics_port
    runner = AutoscaleRunner(str(cluster.redis_url), setup.controller, LocalClusterActuator(cluster, setup.actuator),
                             on_decision=lambda d: _line(decision_line(d)),
                             metrics_addr=None if port is None else (cluster.dep.router.host, port))
    runner.start()
    cfg = setup.controller.config
    _line(f"autoscaler: every {cfg.interval_s:g} s over the last {cfg.window_s:g} s, budget "
          f"{setup.controller.budget.max_instances} instances"
          + (f"; metrics {runner.metrics_url}" if runner.metrics_url else ""))
    return runner


def _line(text: str) -> None:
    """One whole line on stdout (read by scripts and people after the fact: never wrapped)."""
    out.print(text, soft_wrap=True, markup=False, highlight=False)


def _print_endpoints(cluster: object, startup_s: float) -> None:
    from trt_disagg.triton.cluster import LocalCluster
    from trt_disagg.triton.redis_server import redacted_url

    assert isinstance(cluster, LocalCluster)
    print_endpoints(out, cluster.endpoints(), redacted_url(str(cluster.redis_url)), cluster.router_url, startup_s)


def print_endpoints(console: Console, endpoints: Sequence[Endpoint], redis_url: str, router_url: str | None,
                    startup_s: float) -> None:
    """The endpoints, as a table on a terminal, else as plain `key=value` lines.

    Output that is piped or logged is read by scripts and by people after the fact: a table fitted to a
    terminal width that does not exist would cut ports and log paths short, so there every value is printed
    whole, one instance per line, with no wrapping.
    """
    if console.is_terminal:
        table = Table("instance", "model", "gRPC", "HTTP", "KV port", "log")
        for e in endpoints:
            table.add_row(e.instance_id, e.model_name, e.grpc_url, e.http_url, str(e.kv_port), str(e.log_path))
        console.print(table)
        lines = []
    else:
        lines = [f"instance {e.instance_id} model={e.model_name} grpc={e.grpc_url} http={e.http_url} "
                 f"kv_port={e.kv_port} log={e.log_path}" for e in endpoints]
    lines.append(f"Redis: {redis_url}")
    if router_url:
        lines.append(f"Router: {router_url}  (OpenAI API: {router_url}/v1)")
    lines.append(f"ready in {startup_s:.1f}s; Ctrl-C stops everything")
    for line in lines:
        console.print(line, soft_wrap=True, markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the CLI."""
    app.command("render")(render_cmd)
    app.command("serve")(serve_cmd)
