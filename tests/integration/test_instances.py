"""Real tritonserver instances (tiny model: prefill TP2, decode PP2, colocated TP1) driven with tritonclient.

Lifecycle: (1) prefill over gRPC/HTTP answers the first token + handle, (2) decode pulls the KV from the
prefill instance and streams the rest, (3) tokens equal the colocated model's and the engine's alone,
(4) afterwards every KV block on both sides is free (the load the instances publish in Redis).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import redis
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.integration.instances_helpers import grpc_stream, http_generate, prefill
from trt_disagg.config import load_deployment
from trt_disagg.contract import Role, SamplingParams, decode_load
from trt_disagg.keys import load_key
from trt_disagg.kv.handle import decode_handle, encode_handle
from trt_disagg.triton.cluster import LocalCluster

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PROMPT = [1, 520, 33, 4127, 98, 2044, 17, 300, 7, 77, 1234, 45]
N = 10


@pytest.fixture(scope="session")
def tiny_deployment_engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trt_disagg.engine_build.builder import build_deployment

    root = tmp_path_factory.mktemp("tiny-deployment")
    build_deployment(load_deployment(REPO / "configs" / "tiny.yaml"), engines_root=root)
    return root


def start_cluster(engines_root: Path, decoupled: bool) -> LocalCluster:
    cluster = LocalCluster(load_deployment(REPO / "configs" / "tiny.yaml"), engines_root=engines_root,
                           start_router=False, decoupled=decoupled, ready_timeout_s=180)
    cluster.start()
    return cluster


def stop_and_check_leaks(c: LocalCluster) -> None:
    """Stop the cluster; none of its processes, Triton shm regions or KV segments may remain."""
    prefixes = tuple(x for p in c.processes for x in (p.shm_prefix, p.kv_shm_prefix))
    pids = [p.proc.pid for p in c.processes if p.proc is not None]
    c.stop()
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(prefixes)]  # Triton regions, KV segments
    assert not live_in_groups(set(pids))  # stubs and rank processes included


def live_in_groups(pgids: set[int]) -> list[int]:
    """Pids of live (not zombie) processes in the given process groups."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) in pgids:
            out.append(int(entry))
    return out


@pytest.fixture(scope="module")
def cluster(tiny_deployment_engines):
    c = start_cluster(tiny_deployment_engines, decoupled=True)
    yield c
    stop_and_check_leaks(c)


def endpoint(cluster: LocalCluster, role: Role):
    return next(e for e in cluster.endpoints() if e.role is role)


def engine_alone_tokens(engines_root: Path, prompt: list[int], n: int) -> list[int]:
    from trt_disagg.engine.llm_engine import LLMEngine

    eng = LLMEngine.from_engine_dir(engines_root / "tiny" / "colocated")
    try:
        eng.add_request("ref", prompt, SamplingParams(max_new_tokens=n))
        out: list[int] = []
        while eng.has_unfinished():
            out.extend(e.token_id for e in eng.step())
        return out
    finally:
        eng.shutdown()


def wait_all_blocks_free(cluster: LocalCluster, roles=(Role.PREFILL, Role.DECODE), timeout_s: float = 15.0):
    """The published loads (refreshed every heartbeat) until free == total on every instance of `roles`."""
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        deadline = time.monotonic() + timeout_s
        loads = {}
        while time.monotonic() < deadline:
            loads = {e.instance_id: decode_load(client.get(load_key(e.instance_id)))
                     for e in cluster.endpoints() if e.role in roles}
            if all(ld.free_kv_blocks == ld.total_kv_blocks and ld.pending_kv_handoffs == 0
                   for ld in loads.values()):
                return loads
            time.sleep(0.2)  # the heartbeat publishes every 0.5 s
        raise AssertionError(f"KV blocks still in use: {loads}")
    finally:
        client.close()


def test_grpc_disaggregated_equals_colocated_and_engine(cluster, tiny_deployment_engines):
    grpc_client = grpcclient.InferenceServerClient(endpoint(cluster, Role.PREFILL).grpc_url)
    try:
        first, handle = prefill(grpc_client, grpcclient, PROMPT, N)
    finally:
        grpc_client.close()
    rest = grpc_stream(endpoint(cluster, Role.DECODE).grpc_url, "decode", PROMPT, N, handle)
    assert rest.error is None
    colocated = grpc_stream(endpoint(cluster, Role.COLOCATED).grpc_url, "colocated", PROMPT, N,
                            request_type="context_and_generation")
    assert colocated.error is None and len(colocated.tokens) == N
    assert [first, *rest.tokens] == colocated.tokens
    assert colocated.tokens == engine_alone_tokens(tiny_deployment_engines, PROMPT, N)
    wait_all_blocks_free(cluster)


def test_http_prefill_feeds_grpc_decode(cluster):
    http_client = httpclient.InferenceServerClient(endpoint(cluster, Role.PREFILL).http_url)
    try:
        first, handle = prefill(http_client, httpclient, PROMPT, N)
    finally:
        http_client.close()
    rest = grpc_stream(endpoint(cluster, Role.DECODE).grpc_url, "decode", PROMPT, N, handle)
    colocated = grpc_stream(endpoint(cluster, Role.COLOCATED).grpc_url, "colocated", PROMPT, N,
                            request_type="context_and_generation")
    assert [first, *rest.tokens] == colocated.tokens


def test_32_concurrent_requests_complete_and_free_every_block(cluster):
    results: dict[int, list[int]] = {}
    errors: list[str] = []

    def one(i: int) -> None:
        prompt = [(i * 37 + k * 11) % 2000 + 3 for k in range(8 + i)]
        client = grpcclient.InferenceServerClient(endpoint(cluster, Role.PREFILL).grpc_url)
        try:
            first, handle = prefill(client, grpcclient, prompt, 6)
        finally:
            client.close()
        rest = grpc_stream(endpoint(cluster, Role.DECODE).grpc_url, "decode", prompt, 6, handle)
        if rest.error:
            errors.append(rest.error)
        results[i] = [first, *rest.tokens]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(results) == 32
    assert all(1 <= len(toks) <= 6 for toks in results.values())
    loads = wait_all_blocks_free(cluster)
    assert all(ld.total_kv_blocks > 0 for ld in loads.values())


def test_forged_and_expired_handles_are_refused_and_nothing_leaks(cluster):
    client = grpcclient.InferenceServerClient(endpoint(cluster, Role.PREFILL).grpc_url)
    try:
        first, handle = prefill(client, grpcclient, PROMPT, N)
    finally:
        client.close()
    decode_url = endpoint(cluster, Role.DECODE).grpc_url
    forged = bytearray(handle)
    forged[20] ^= 0x01
    r = grpc_stream(decode_url, "decode", PROMPT, N, bytes(forged))
    assert r.error is not None and "invalid_handle" in r.error and "signature" in r.error

    secret = bytes.fromhex(str(cluster.secret_hex))
    from dataclasses import replace

    stale = replace(decode_handle(handle, secret), expires_at=time.time() - 5)
    r = grpc_stream(decode_url, "decode", PROMPT, N, encode_handle(stale, secret))
    assert r.error is not None and "invalid_handle" in r.error and "expired" in r.error

    ok = grpc_stream(decode_url, "decode", PROMPT, N, handle)  # the real handle still works once
    assert ok.error is None and len(ok.tokens) == N - 1
    again = grpc_stream(decode_url, "decode", PROMPT, N, handle)
    assert again.error is not None and "kv_transfer_failed" in again.error and "not held" in again.error
    wait_all_blocks_free(cluster)


def test_cancelled_decode_stream_frees_its_blocks(cluster):
    client = grpcclient.InferenceServerClient(endpoint(cluster, Role.PREFILL).grpc_url)
    try:
        _, handle = prefill(client, grpcclient, PROMPT, 200)
    finally:
        client.close()
    r = grpc_stream(endpoint(cluster, Role.DECODE).grpc_url, "decode", PROMPT, 200, handle, cancel_after=2)
    assert 2 <= len(r.tokens) < 199
    wait_all_blocks_free(cluster)


def test_killed_prefill_instance_gives_decode_a_clear_error(cluster):
    """Runs last in this module: it kills the prefill instance."""
    client = grpcclient.InferenceServerClient(endpoint(cluster, Role.PREFILL).grpc_url)
    try:
        _, handle = prefill(client, grpcclient, PROMPT, N)
    finally:
        client.close()
    proc = next(p for p in cluster.processes if p.instance_id == "prefill-0")
    assert proc.proc is not None
    os.killpg(proc.proc.pid, signal.SIGKILL)
    proc.proc.wait()
    t0 = time.monotonic()
    r = grpc_stream(endpoint(cluster, Role.DECODE).grpc_url, "decode", PROMPT, N, handle)
    assert r.error is not None and "kv_transfer_failed" in r.error
    assert "prefill instance prefill-0" in r.error and "unreachable" in r.error
    assert time.monotonic() - t0 < 30  # an error, not a hang
    wait_all_blocks_free(cluster, roles=(Role.DECODE,))


def test_http_only_deployment_non_decoupled(tiny_deployment_engines):
    """decode/colocated rendered non-decoupled: the whole flow over HTTP with tritonclient.http."""
    c = start_cluster(tiny_deployment_engines, decoupled=False)
    try:
        client = httpclient.InferenceServerClient(endpoint(c, Role.PREFILL).http_url)
        try:
            first, handle = prefill(client, httpclient, PROMPT, N)
        finally:
            client.close()
        rest = http_generate(endpoint(c, Role.DECODE).http_url, "decode", PROMPT, N, handle)
        colocated = http_generate(endpoint(c, Role.COLOCATED).http_url, "colocated", PROMPT, N,
                                  request_type="context_and_generation")
        assert [first, *rest] == colocated and len(colocated) == N
        wait_all_blocks_free(c)
    finally:
        stop_and_check_leaks(c)
