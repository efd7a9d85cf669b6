"""One real instance (the tiny prefill engine, TP2: a tritonserver, its Python-backend stub and two rank
processes) registered in an embedded Valkey, broken on purpose:

(1) paused (SIGSTOP) past its heartbeat TTL: readers prune it; resumed, it rejoins its role set and serves;
(2) Redis restarted empty on the same port: the instance repopulates its role set, info, load and the
    deployment's KV secret by itself, without being restarted;
(3) while it runs, none of its processes (nor Valkey) listens on a wildcard address;
(4) SIGTERM stops the whole instance (server, stub, ranks) in under 3 s, deregistered, and leaves no temporary
    files: its processes kept them in the instance's own directory, removed when it stops.
The tests share the instance and run in this order; (4) ends it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import tritonclient.grpc as grpcclient

from tests.faults.helpers import (
    TINY_CONFIG,
    WILDCARDS,
    group_pids,
    listeners,
    registered,
    temp_entries,
    wait_for,
)
from tests.integration.instances_helpers import prefill
from trt_disagg.config import load_deployment
from trt_disagg.contract import Role
from trt_disagg.keys import KV_SECRET_KEY, instance_key, load_key
from trt_disagg.triton.cluster import LocalCluster
from trt_disagg.triton.redis_server import EmbeddedRedis
from trt_disagg.triton.registry import DEFAULT_TTL_S

pytestmark = pytest.mark.slow

PROCESS_TEMP = ("pymp-", "python_env_")  # what the instance's processes themselves could leave in /tmp
PROMPT = [1, 520, 33, 4127, 98, 2044, 17, 300]
ID = "prefill-0"


class OneInstance:
    """An embedded Valkey and the tiny deployment's prefill instance registered in it."""

    def __init__(self, engines_root: Path) -> None:
        self.valkey = EmbeddedRedis()
        self.redis_url = self.valkey.start()
        dep = load_deployment(TINY_CONFIG)
        dep = dep.model_copy(update={"redis": dep.redis.model_copy(update={"url": self.redis_url})})
        self.cluster = LocalCluster(dep, engines_root=engines_root, only=[ID], start_router=False,
                                    ready_timeout_s=180)
        self.temp_before: set[str] = set()  # the system temporary directory's entries before it started

    @property
    def server(self):  # the instance's TritonProcess
        (proc,) = self.cluster.processes
        return proc

    def serves(self) -> bool:
        client = grpcclient.InferenceServerClient(self.server.grpc_url)
        try:
            first, handle = prefill(client, grpcclient, PROMPT, 4)
            return isinstance(first, int) and len(handle) > 0
        finally:
            client.close()

    def stop(self) -> None:
        self.cluster.stop()
        self.valkey.stop()


@pytest.fixture(scope="module")
def one(tiny_root: Path) -> Iterator[OneInstance]:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("REDIS_URL", raising=False)
        mp.delenv("TRT_DISAGG_KV_SECRET", raising=False)
        inst = OneInstance(tiny_root)
        inst.temp_before = temp_entries(PROCESS_TEMP)
        try:
            inst.cluster.start()
            yield inst
        finally:
            inst.stop()


def test_paused_past_the_ttl_rejoins_after_resume(one: OneInstance) -> None:
    assert registered(one.redis_url, Role.PREFILL) == {ID}
    pgid = one.server.proc.pid
    os.killpg(pgid, signal.SIGSTOP)
    try:
        out_s = wait_for(lambda: ID not in registered(one.redis_url, Role.PREFILL), DEFAULT_TTL_S + 10,
                         "the paused instance leaves the role set")
    finally:
        os.killpg(pgid, signal.SIGCONT)
    back_s = wait_for(lambda: ID in registered(one.redis_url, Role.PREFILL), 10,
                      "the resumed instance rejoins its role set")
    assert one.serves()
    print(f"paused instance pruned after {out_s:.1f}s; rejoined {back_s:.2f}s after SIGCONT")


def test_redis_restart_is_repopulated_without_restarting_the_instance(one: OneInstance) -> None:
    server_pid = one.server.proc.pid
    port = one.redis_url.rsplit(":", 1)[1]
    t0 = time.monotonic()
    assert one.valkey.restart() == one.redis_url  # a fresh, empty server on the same port
    client = redis.Redis.from_url(one.redis_url)
    try:
        assert one.redis_url.endswith(port)
        back_s = wait_for(lambda: ID in registered(one.redis_url, Role.PREFILL), 10,
                          "the registry is repopulated after the Redis restart")
        assert client.get(instance_key(ID)) is not None and client.get(load_key(ID)) is not None
        assert client.get(KV_SECRET_KEY).decode() == one.cluster.secret_hex  # the secret the instance uses
    finally:
        client.close()
    assert one.server.proc.pid == server_pid and one.server.alive()  # nothing was restarted
    assert one.serves()
    print(f"registry repopulated {back_s:.2f}s after the restart ({time.monotonic() - t0:.2f}s in all)")


def test_nothing_listens_on_a_wildcard_address(one: OneInstance) -> None:
    pids = group_pids(one.server.proc.pid)  # tritonserver, its stub, the two rank processes
    assert len(pids) >= 4, pids
    assert one.valkey.pid is not None
    found = listeners([*pids, one.valkey.pid])
    ports = {port for _, _, port in found}
    p = one.server.ports
    assert {p.grpc, p.http, p.kv} <= ports  # the check sees the instance's own listeners (no metrics server)
    wild = [(pid, addr, port) for pid, addr, port in found if addr in WILDCARDS]
    assert not wild, f"listening on every interface (pid, address, port): {wild}"


def test_instance_stops_in_under_3s(one: OneInstance) -> None:
    proc = one.server.proc
    pgid = proc.pid
    assert ID in registered(one.redis_url, Role.PREFILL)
    tmp_dir = one.server.tmp_dir
    assert tmp_dir is not None and list(tmp_dir.glob("trtd-ranks-*"))  # the rank processes' files are in it
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    while group_pids(pgid) and time.monotonic() - t0 < 30:
        time.sleep(0.01)  # measuring how long the group takes to exit on its own
    stop_s = time.monotonic() - t0
    code = proc.wait(timeout=5)
    print(f"instance (tritonserver + stub + 2 ranks) stopped in {stop_s:.2f}s, exit code {code}")
    assert code == 0  # it stopped by itself (graceful: the model finalized), not killed
    assert ID not in registered(one.redis_url, Role.PREFILL)  # deregistered on the way out
    prefixes = (one.server.shm_prefix, one.server.kv_shm_prefix)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(prefixes)]  # nothing left for serve to clean
    assert stop_s < 3.0
    one.server.stop()
    assert not tmp_dir.exists()
    assert not temp_entries(PROCESS_TEMP) - one.temp_before  # (the deployment's run directory is the fixture's)
