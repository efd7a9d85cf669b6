"""Instance health without Triton: when the engine breaks (a rank died) or the server is gone, the instance
fails what it holds with a clear error, refuses new work, deregisters and reports, once."""

from __future__ import annotations

import threading

import pytest
import redis

from tests.unit.triton.test_triton_instance import Recorder, request
from trt_disagg import keys
from trt_disagg.contract import ErrorKind, RequestType, Role
from trt_disagg.kv.handle import new_secret
from trt_disagg.triton.adapter import InstanceSettings, RunningInstance
from trt_disagg.triton.fake_engine import FakeEngine
from trt_disagg.triton.instance import InstanceServer
from trt_disagg.triton.redis_server import EmbeddedRedis

WAIT_S = 60.0  # a hang guard only


def test_failed_engine_fails_held_requests_and_refuses_new_ones():
    engine = FakeEngine(Role.COLOCATED, step_s=0.05)
    server = InstanceServer(Role.COLOCATED, engine, new_secret())
    server.start()
    try:
        held = Recorder()
        server.submit(request([1, 2, 3], RequestType.CONTEXT_AND_GENERATION, n=400), held)
        server.fail_engine("rank process died: rank 1 (exit code -9)")
        assert held.wait().errors and held.errors[0][0] is ErrorKind.INTERNAL
        assert "rank 1" in held.errors[0][1] and held.num_final == 1
        late = Recorder()
        server.submit(request([4, 5], RequestType.CONTEXT_AND_GENERATION), late)
        assert late.wait().errors[0][0] is ErrorKind.INTERNAL and late.tokens == []
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_url():
    server = EmbeddedRedis()
    yield server.start()
    server.stop()


def settings(redis_url: str) -> InstanceSettings:
    return InstanceSettings(engine_dir="fake:colocated", role=Role.COLOCATED, model_name="colocated",
                            instance_id="colocated-7", transport="auto", handle_ttl_s=60.0, max_pending_tokens=None,
                            threads_per_rank=None, kv_host="127.0.0.1", kv_port=0, advertise_host="127.0.0.1",
                            grpc_url="127.0.0.1:1", http_url="127.0.0.1:2", redis_url=redis_url, kv_shm_prefix=None)


@pytest.mark.parametrize("cause", ["engine", "server"])
def test_watch_deregisters_and_reports_once(redis_url, cause):
    client = redis.Redis.from_url(redis_url)
    reported: list[str] = []
    done = threading.Event()
    server_up = threading.Event()
    server_up.set()

    def on_failure(reason: str) -> None:
        reported.append(reason)
        done.set()

    inst = RunningInstance(settings(redis_url), on_failure=on_failure, server_alive=server_up.is_set)
    try:
        assert client.sismember(keys.role_set_key(Role.COLOCATED), "colocated-7")
        engine = inst.server.engine
        assert isinstance(engine, FakeEngine)
        if cause == "engine":
            engine.broken = "rank process died: rank 1 (exit code -9)"
        else:
            server_up.clear()
        assert done.wait(WAIT_S)
        assert not client.sismember(keys.role_set_key(Role.COLOCATED), "colocated-7")
        assert client.get(keys.instance_key("colocated-7")) is None
        assert reported == ["rank process died: rank 1 (exit code -9)" if cause == "engine"
                            else "its tritonserver is gone"]
        refused = Recorder()
        inst.server.submit(request([1], RequestType.CONTEXT_AND_GENERATION), refused)
        assert refused.wait().errors[0][0] is ErrorKind.INTERNAL
    finally:
        inst.stop()
        client.close()
