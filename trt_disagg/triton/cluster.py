"""Everything `trt-disagg serve` starts for a deployment on this host, started and stopped as one.

    start(): Redis (embedded Valkey unless REDIS_URL / redis.url) ─▶ KV secret (env, or Redis: first wins)
             ─▶ render one repository per instance into a temp run dir ─▶ start every tritonserver
             ─▶ wait until each model is ready ─▶ the router (when the router package is present)
    stop():  router ─▶ instances (SIGTERM, then kill) ─▶ Redis ─▶ run dir.   Idempotent, any order of failure.

A start that fails (port taken, engine missing, model fails to load) stops what was started and raises
UserError with the reason and the failing instance's log tail. After start-up, each process it owns is
named (`supervised()`: "redis", "router", the instance ids) and can be checked (`why_down`) and replaced
in place (`restart`, same ports, returns at once); `triton.supervise` decides when.

Scaling (the autoscaler's actuator, from its own thread; one change at a time):
    add_instance(role)      a new id (<role>-<next index>, never reused), new ports, launched; supervised only
                            once `wait_instance_ready` saw its model ready (it registers itself then, and only
                            then takes work)
    retire_instance(id)     out of supervision at once (its stop is no crash to repair), then triton.retire:
                            drain, wait until idle (bounded), deregister; stop the process; clear its keys
    discard_instance(id)    stop one that never became ready, and forget it
A lock guards the process table: the supervisor's tick and the actuator's thread both read and change it.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from trt_disagg.config import Deployment
from trt_disagg.contract import Role
from trt_disagg.engine_dir import CONFIG_FILE
from trt_disagg.errors import UserError
from trt_disagg.kv.handle import new_secret, secret_from_env
from trt_disagg.triton import launch, listen, retire
from trt_disagg.triton.fake_engine import FAKE_PREFIX
from trt_disagg.triton.redis_server import EmbeddedRedis, configured_redis_url
from trt_disagg.triton.registry import get_or_create_secret
from trt_disagg.triton.render import InstancePlan, plan_instances, render_instance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    instance_id: str
    role: Role
    model_name: str
    grpc_url: str
    http_url: str
    kv_port: int
    log_path: Path


class LocalCluster:
    """The instances (all, or `only` some ids) of one deployment on this host."""

    def __init__(self, dep: Deployment, *, config_path: Path | None = None, engines_root: Path | None = None,
                 only: list[str] | None = None, start_router: bool = True, decoupled: bool = True,
                 engine_overrides: dict[Role, str] | None = None, ready_timeout_s: float = 300.0,
                 transport: str | None = None, run_dir: Path | None = None, iteration_logs: bool = False) -> None:
        self.dep = dep
        self._config_path = config_path
        self._engines_root = engines_root
        self._only = only
        self._start_router = start_router
        self._decoupled = decoupled
        self._engine_overrides = engine_overrides or {}
        self._ready_timeout_s = ready_timeout_s
        self._transport = transport
        self.redis_url: str | None = None
        self.secret_hex: str | None = None
        self.processes: list[launch.TritonProcess] = []
        self._used_ports: set[int] = set()
        self.router_proc: subprocess.Popen | None = None
        self.router_url: str | None = None
        self._router_port: int | None = None
        self._plans: dict[str, InstancePlan] = {}
        self._next_index: dict[Role, int] = {}  # ids are never reused
        self._redis: EmbeddedRedis | None = None
        self.run_dir: Path | None = run_dir  # repositories and logs; a temp dir (removed on stop) when None
        self._own_run_dir = run_dir is None
        self._iteration_logs = iteration_logs  # each instance writes <run_dir>/<id>.iterations.jsonl
        self._lock = threading.RLock()  # the process table: supervisor tick vs the actuator's thread
        self._starting: set[str] = set()  # launched by add_instance, not ready yet: not supervised
        self._retiring: set[str] = set()  # being drained and stopped on purpose: not supervised

    # ---- plan ----
    def plans(self) -> list[InstancePlan]:
        plans = plan_instances(self.dep, self._engines_root)
        if self._only is not None:
            known = {p.instance_id for p in plans}
            unknown = [i for i in self._only if i not in known]
            if unknown:
                raise UserError(f"--instance {', '.join(unknown)}: not in this deployment "
                                f"(instances: {', '.join(sorted(known))})")
            plans = [p for p in plans if p.instance_id in self._only]
        return [self._adjusted(p) for p in plans]

    def _adjusted(self, p: InstancePlan) -> InstancePlan:
        """A plan with this cluster's engine override and KV transport applied."""
        override = self._engine_overrides.get(p.role)
        if override is not None:
            p = replace(p, engine_dir=Path(override))
        if self._transport is not None:
            ct = p.group.cache_transceiver_config.model_copy(update={"backend": self._transport})
            p = replace(p, group=p.group.model_copy(update={"cache_transceiver_config": ct}))
        return p

    def _check_engines(self, plans: list[InstancePlan]) -> None:
        for p in plans:
            if p.backend != "python" or str(p.engine_dir).startswith(FAKE_PREFIX):
                continue
            if not (p.engine_dir / CONFIG_FILE).is_file():
                raise UserError(f"engine for {p.role} missing: {p.engine_dir}/{CONFIG_FILE} not found "
                                "(build it with `trt-disagg build CONFIG`)")

    # ---- start / stop ----
    def start(self) -> None:
        plans = self.plans()
        self._check_engines(plans)
        if any(p.backend == "tensorrtllm" for p in plans) and launch.system_tritonserver() is None:
            raise UserError("the tensorrtllm backend needs `tritonserver` on PATH (the NGC Triton TRT-LLM "
                            "container); this host has none")
        try:
            self._start(plans)
        except BaseException:
            self.stop()
            raise

    def _start(self, plans: list[InstancePlan]) -> None:
        t0 = time.monotonic()
        if self.run_dir is None:
            self.run_dir = launch.make_run_dir()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self._iteration_logs:
            # An instance appends to its log (a restart continues it); a new deployment in a reused run_dir
            # starts new logs, or its steps would be read together with an earlier deployment's.
            for plan in plans:
                self.iteration_log_path(plan.instance_id).unlink(missing_ok=True)
        self.redis_url = configured_redis_url(self.dep)
        if self.redis_url is None:
            if self._only is not None:
                raise UserError("--instance needs a shared Redis: set REDIS_URL (or redis.url in the config) "
                                "to the one the other hosts use")
            self._redis = EmbeddedRedis()
            self.redis_url = self._redis.start()
        self.secret_hex = self._secret()
        self._plans = {p.instance_id: p for p in plans}
        self._next_index = {role: 1 + max((p.index for p in plans if p.role is role), default=-1) for role in Role}
        launched = [(p, self._launch(p)) for p in plans]  # all start loading in parallel
        self.processes = [proc for _, proc in launched]
        for i, (plan, proc) in enumerate(launched):
            self.processes[i] = self._ready(plan, proc)
        if self._start_router:
            self._launch_router()
        log.info("deployment %s up in %.1fs", self.dep.name, time.monotonic() - t0)

    def _ready(self, plan: InstancePlan, proc: launch.TritonProcess, attempts: int = 3) -> launch.TritonProcess:
        """Wait for an instance; if a port we picked was taken meanwhile by another process, retry with new
        ports (a port given in `urls` is the user's: that failure is reported as is)."""
        for attempt in range(1, attempts + 1):
            try:
                proc.wait_ready(self._ready_timeout_s)
                return proc
            except UserError:
                if plan.url is not None or attempt == attempts or not proc.port_conflict():
                    raise
                log.warning("a port of %s was taken during start-up; retrying with new ports", plan.instance_id)
                proc.stop()
                self.processes[self.processes.index(proc)] = proc = self._launch(plan)
        raise AssertionError("unreachable")

    def _secret(self) -> str:
        env = secret_from_env(create_file=True)
        candidate = env.hex() if env is not None else new_secret().hex()
        import redis

        client = redis.Redis.from_url(str(self.redis_url))
        try:
            return get_or_create_secret(client, candidate) if env is None else candidate
        except redis.RedisError as exc:
            raise UserError(f"Redis at {self.redis_url} unreachable: {exc}") from None
        finally:
            client.close()

    def iteration_log_path(self, instance_id: str) -> Path:
        assert self.run_dir is not None
        return self.run_dir / f"{instance_id}.iterations.jsonl"

    def _launch(self, plan: InstancePlan, ports: launch.Ports | None = None) -> launch.TritonProcess:
        assert self.run_dir is not None
        binary = (launch.system_tritonserver() if plan.backend == "tensorrtllm"
                  else launch.bundled_tritonserver(self.run_dir))
        assert binary is not None
        host, grpc_port, bind = "127.0.0.1", None, "127.0.0.1"
        if plan.url is not None:
            host, _, port = plan.url.rpartition(":")
            grpc_port, bind = int(port), listen.bind_host(host)
        if ports is None:
            ports = listen.fixed_ports(launch.Ports.pick(bind, grpc=grpc_port, exclude=self._used_ports))
        self._used_ports |= {ports.grpc, ports.http, ports.metrics, ports.kv}
        repo = render_instance(plan, self.run_dir / "repos", decoupled=self._decoupled,
                               url=f"{host}:{ports.grpc}")
        env = launch.server_env(binary, {
            **plan.env(),
            "TRTD_INSTANCE_ID": plan.instance_id, "TRTD_KV_HOST": bind, "TRTD_KV_PORT": str(ports.kv),
            "TRTD_ADVERTISE_HOST": host, "TRTD_GRPC_URL": f"{host}:{ports.grpc}",
            "TRTD_HTTP_URL": f"{host}:{ports.http}", "REDIS_URL": str(self.redis_url),
            "TRT_DISAGG_KV_SECRET": str(self.secret_hex),
            **({"TRTD_ITERATION_LOG": str(self.iteration_log_path(plan.instance_id))} if self._iteration_logs else {}),
        }, threads=plan.group.threads_per_instance * plan.group.world_size)
        proc = launch.TritonProcess(plan.instance_id, plan.model_name, repo, binary, ports, env,
                                    self.run_dir / f"{plan.instance_id}.log", host=host, bind=bind)
        proc.start()
        return proc

    def _launch_router(self) -> None:
        if self._config_path is None:
            log.info("no router started (no config path)")
            return
        host, self._router_port = self.dep.router.host, self.dep.router.port or launch.free_port()
        self._spawn_router()
        self.router_url = f"http://{host}:{self._router_port}"
        self._wait_router(self.router_url)

    def _spawn_router(self) -> None:
        """Start the router package's entry point (router/__main__.py: RouterSettings, then uvicorn)."""
        assert self.run_dir is not None and self._config_path is not None
        logf = open(self.run_dir / "router.log", "ab")  # noqa: SIM115 - owned by the process below
        self.router_proc = subprocess.Popen(
            [sys.executable, "-m", "router", str(self._config_path),
             "--redis-url", str(self.redis_url), "--port", str(self._router_port),
             *(["--engines-dir", str(self._engines_root)] if self._engines_root is not None else [])],
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        logf.close()

    def _wait_router(self, url: str) -> None:
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.router_proc is None or self.router_proc.poll() is not None:
                raise UserError(f"router exited during start-up; log {self.run_dir}/router.log")
            try:
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)  # polling another process's readiness
        raise UserError(f"router at {url} not healthy after 60s; log {self.run_dir}/router.log")

    def stop(self) -> None:
        """Stop everything this cluster started; safe to call twice or after a failed start."""
        router, self.router_proc = self.router_proc, None
        if router is not None:
            launch.stop_process(router, timeout_s=5.0)
        procs, self.processes = self.processes, []
        for proc in procs:  # SIGTERM all first: they shut down in parallel
            if proc.proc is not None and proc.alive():
                proc.proc.terminate()
        for proc in procs:
            proc.stop()
        if self._redis is not None:
            self._redis.stop()
            self._redis = None
        if self.run_dir is not None and self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    # ---- supervision: each owned process by name ----
    def supervised(self) -> dict[str, Role | None]:
        """Every process this cluster owns and can restart, by name, with the role it serves (instances)."""
        with self._lock:
            names: dict[str, Role | None] = {p.instance_id: self._plans[p.instance_id].role for p in self.processes
                                             if p.instance_id not in self._starting | self._retiring}
        if self._redis is not None:
            names["redis"] = None
        if self.router_proc is not None:
            names["router"] = None
        return names

    def why_down(self, name: str) -> str | None:
        """None while the named process runs; else how it ended (exit code or signal)."""
        if name == "redis":
            return None if self._redis is None or self._redis.alive() else "the embedded Valkey exited"
        if name == "router":
            return None if self.router_proc is None or self.router_proc.poll() is None else _exit_reason(
                self.router_proc.returncode)
        server = self._process(name)
        code = None if server.proc is None else server.proc.poll()
        if server.proc is not None and code is None:
            return None
        own = server.own_failure() if code is not None and code >= 0 else None  # killed: the kill is why
        return _exit_reason(code) if own is None else f"{_exit_reason(code)}: {own}"

    def restart(self, name: str) -> None:
        """Replace a process that is down, on the same ports; returns once it is launched (an instance
        registers itself in Redis when its model is ready; the router reconnects to Redis by itself)."""
        if name == "redis":
            assert self._redis is not None
            self._redis.restart()
        elif name == "router":
            if self.router_proc is not None:
                launch.stop_process(self.router_proc, timeout_s=1.0)
            self._spawn_router()
        else:
            with self._lock:
                if name in self._retiring or name not in self._plans:
                    return  # retired on purpose meanwhile: nothing to repair
                old = self._process(name)
                ports = None if old.port_conflict() else old.ports  # taken meanwhile by someone else: new ones
                old.stop(timeout_s=1.0)  # gone already: kills what is left of its group, removes its shm
                self.processes[self.processes.index(old)] = self._launch(self._plans[name], ports)

    def _process(self, instance_id: str) -> launch.TritonProcess:
        with self._lock:
            return next(p for p in self.processes if p.instance_id == instance_id)

    # ---- scaling: the autoscaler's actuator adds and retires instances ----
    def serving(self, role: Role) -> list[str]:
        """Instances of `role` that are up and supervised (not starting, not being retired), by id."""
        return sorted(name for name, r in self.supervised().items() if r is role)

    def add_instance(self, role: Role) -> str:
        """Launch a new instance of `role` (its group's engine and limits); returns its id at once. It takes
        no work until its model is ready (it registers itself then); supervised after `wait_instance_ready`."""
        with self._lock:
            plan = self._new_plan(role)
            self._check_engines([plan])
            self._plans[plan.instance_id] = plan
            self._starting.add(plan.instance_id)
            try:
                self.processes.append(self._launch(plan))
            except BaseException:
                self._starting.discard(plan.instance_id)
                del self._plans[plan.instance_id]
                raise
        log.info("started %s (%s engine %s)", plan.instance_id, role.value, plan.engine_dir)
        return plan.instance_id

    def _new_plan(self, role: Role) -> InstancePlan:
        group = self.dep.groups().get(role)
        if group is None:
            raise UserError(f"this deployment has no {role.value} servers to add one of")
        if group.urls:
            raise UserError(f"{role.value} servers have fixed `urls`: an instance cannot be added on this host")
        index = self._next_index.get(role, 0)
        self._next_index[role] = index + 1
        world = group.world_size
        used_gpus = {g for p in self._plans.values() for g in p.gpu_device_ids}
        free = [g for g in range(group.gpus_per_node) if g not in used_gpus]
        gpus = tuple(free[:world]) if len(free) >= world else tuple(range(world))
        first = 1 + max((q for p in self._plans.values() for q in p.participant_ids), default=0)
        engine_dir = self.dep.engine_dir(role, self._engines_root).resolve()
        return self._adjusted(InstancePlan(f"{role.value}-{index}", role, index, group, engine_dir, gpus,
                                           tuple(range(first, first + world))))

    def wait_instance_ready(self, instance_id: str, timeout_s: float, abort: threading.Event | None = None) -> None:
        """Until an added instance's model is ready (then it is supervised); UserError with its log tail if it
        exits, does not get ready in `timeout_s`, or `abort` is set."""
        deadline = time.monotonic() + timeout_s
        proc = self._process(instance_id)
        while True:
            if abort is not None and abort.is_set():
                raise UserError(f"instance {instance_id}: start-up abandoned (stopping)")
            left = deadline - time.monotonic()
            try:
                proc.wait_ready(max(0.1, min(1.0, left)))  # in slices, so that `abort` is seen
                break
            except UserError:
                if not proc.alive() or left <= 1.0:
                    raise
        with self._lock:
            self._starting.discard(instance_id)

    def discard_instance(self, instance_id: str) -> None:
        """Stop an added instance that never became ready, and forget it (it never registered)."""
        proc = self._process(instance_id)
        proc.stop(timeout_s=5.0)
        self._forget(instance_id)

    def retire_instance(self, instance_id: str, drain_timeout_s: float,
                        abort: threading.Event | None = None) -> retire.DrainResult:
        """Drain (bounded by `drain_timeout_s`), deregister, stop and clear one instance; never the last
        serving instance of its role. The supervisor stops watching it first: this stop is on purpose."""
        import redis

        with self._lock:
            role = self._plans[instance_id].role
            others = [i for i in self.serving(role) if i != instance_id]
            if not others:
                raise UserError(f"{instance_id} is the last {role.value} instance serving: not retiring it")
            self._retiring.add(instance_id)
        client = redis.Redis.from_url(str(self.redis_url))
        try:
            result = retire.drain(client, instance_id, drain_timeout_s, abort)
            retire.deregister(client, instance_id, role)
            self._process(instance_id).stop()
            retire.clear(client, instance_id)
        finally:
            client.close()
            self._forget(instance_id)
        if not result.idle:
            log.warning("%s retired after its %.0f s drain deadline (still in flight: %s); that work fails over "
                        "through the router", instance_id, drain_timeout_s, result.in_flight)
        return result

    def _forget(self, instance_id: str) -> None:
        with self._lock:
            self.processes = [p for p in self.processes if p.instance_id != instance_id]
            self._plans.pop(instance_id, None)
            self._starting.discard(instance_id)
            self._retiring.discard(instance_id)

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint(p.instance_id, Role(p.model_name), p.model_name, p.grpc_url, p.http_url, p.ports.kv,
                         p.log_path) for p in self.processes]

    def dead_instances(self) -> list[str]:
        return [p.instance_id for p in self.processes if not p.alive()]

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "not running"
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"
