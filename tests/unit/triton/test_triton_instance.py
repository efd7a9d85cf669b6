"""The instance logic without Triton: fake engines, the socket KV transport, recording responders.

Walks the disaggregated lifecycle: (1) prefill answers first token + handle, (2) decode pulls the KV and
streams the rest, (3) the tokens equal the colocated path's, (4) every KV block on both sides is free.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from trt_disagg.contract import ErrorKind, RequestType, Role, SamplingParams
from trt_disagg.kv.handle import new_secret
from trt_disagg.kv.transport import make_sender
from trt_disagg.triton.fake_engine import FakeEngine
from trt_disagg.triton.instance import InstanceServer
from trt_disagg.triton.tensors import InstanceRequest

WAIT_S = 120.0  # a hang guard only; the machine is shared


class Recorder:
    """A Responder that records what was sent and lets the test wait for the final response."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.handles: list[bytes] = []
        self.errors: list[tuple[ErrorKind, str]] = []
        self.num_final = 0
        self.cancelled = threading.Event()
        self.done = threading.Event()

    def send(self, token_ids, context_phase_params, final):
        self.tokens.extend(token_ids)
        if context_phase_params is not None:
            self.handles.append(context_phase_params)
        if final:
            self.num_final += 1
            self.done.set()

    def send_error(self, kind, message):
        self.errors.append((kind, message))
        self.num_final += 1
        self.done.set()

    def is_cancelled(self):
        return self.cancelled.is_set()

    def wait(self) -> Recorder:
        assert self.done.wait(WAIT_S), "no final response"
        return self


def request(prompt, rtype, cpp=None, n=6, streaming=True, rid="r"):
    return InstanceRequest(request_id=rid, prompt_ids=list(prompt), sampling=SamplingParams(max_new_tokens=n),
                           request_type=rtype, streaming=streaming, context_phase_params=cpp)


@pytest.fixture
def secret():
    return new_secret()


@pytest.fixture
def cluster(secret):
    """A prefill (TP2) and a decode (PP2) instance plus a colocated one, all on fake engines."""
    pe = FakeEngine(Role.PREFILL, tp=2)
    sender = make_sender("tcp", source=pe, secret=secret, instance_id="prefill-0", layout=pe.config.kv_layout())
    servers = {
        Role.PREFILL: InstanceServer(Role.PREFILL, pe, secret, sender=sender),
        Role.DECODE: InstanceServer(Role.DECODE, FakeEngine(Role.DECODE, pp=2), secret, transport="auto"),
        Role.COLOCATED: InstanceServer(Role.COLOCATED, FakeEngine(Role.COLOCATED), secret),
    }
    for s in servers.values():
        s.start()
    yield servers
    for s in servers.values():
        s.stop()


def disagg(cluster, prompt, n=6, streaming=True, rid="r"):
    first = Recorder()
    cluster[Role.PREFILL].submit(request(prompt, RequestType.CONTEXT_ONLY, n=n, rid=rid), first)
    first.wait()
    assert not first.errors, first.errors
    rest = Recorder()
    cluster[Role.DECODE].submit(request(prompt, RequestType.GENERATION_ONLY, first.handles[0], n, streaming, rid),
                                rest)
    return first, rest.wait()


def all_free(cluster):
    return all(s.engine.num_free_blocks == s.engine.num_total_blocks for s in cluster.values())


@pytest.mark.parametrize("streaming", [True, False])
def test_disaggregated_tokens_equal_colocated(cluster, streaming):
    prompt = list(range(10, 50))
    first, rest = disagg(cluster, prompt, n=6, streaming=streaming)
    assert len(first.tokens) == 1 and len(first.handles) == 1 and first.num_final == 1
    colo = Recorder()
    cluster[Role.COLOCATED].submit(request(prompt, RequestType.CONTEXT_AND_GENERATION, n=6), colo)
    colo.wait()
    assert first.tokens + rest.tokens == colo.tokens
    assert len(colo.tokens) == 6 and rest.num_final == 1 and not rest.errors
    assert all_free(cluster)


def test_many_concurrent_requests_all_complete_and_free_everything(cluster):
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(disagg(cluster, [i + 5] * (8 + i), rid=f"c{i}")))
               for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert len(results) == 32
    assert all(len(f.tokens) + len(r.tokens) == 6 and not r.errors for f, r in results)
    assert all_free(cluster)
    assert cluster[Role.PREFILL].load().pending_kv_handoffs == 0


def test_wrong_request_type_is_refused(cluster):
    rec = Recorder()
    cluster[Role.PREFILL].submit(request([1, 2, 3], RequestType.GENERATION_ONLY), rec)
    assert rec.wait().errors[0][0] is ErrorKind.BAD_REQUEST


def test_forged_handle_is_refused_and_prefill_kv_stays_until_released(cluster):
    prompt = list(range(1, 20))
    first = Recorder()
    cluster[Role.PREFILL].submit(request(prompt, RequestType.CONTEXT_ONLY), first)
    handle = bytearray(first.wait().handles[0])
    handle[-1] ^= 0xFF
    rec = Recorder()
    cluster[Role.DECODE].submit(request(prompt, RequestType.GENERATION_ONLY, bytes(handle)), rec)
    kind, message = rec.wait().errors[0]
    assert kind is ErrorKind.INVALID_HANDLE and "signature" in message
    assert not all_free(cluster)  # the real owner's KV is untouched...
    cluster[Role.PREFILL]._sender.reap_expired(now=1e12)  # ...until it expires
    assert all_free(cluster)


def test_handle_with_other_prompt_is_refused(cluster):
    first = Recorder()
    cluster[Role.PREFILL].submit(request([5] * 20, RequestType.CONTEXT_ONLY), first)
    rec = Recorder()
    cluster[Role.DECODE].submit(request([5] * 21, RequestType.GENERATION_ONLY, first.wait().handles[0]), rec)
    assert rec.wait().errors[0][0] is ErrorKind.INVALID_HANDLE


def test_prefill_gone_gives_clear_error(cluster):
    first = Recorder()
    cluster[Role.PREFILL].submit(request([7] * 20, RequestType.CONTEXT_ONLY), first)
    handle = first.wait().handles[0]
    cluster[Role.PREFILL].stop()
    rec = Recorder()
    cluster[Role.DECODE].submit(request([7] * 20, RequestType.GENERATION_ONLY, handle), rec)
    kind, message = rec.wait().errors[0]
    assert kind is ErrorKind.KV_TRANSFER_FAILED and "prefill instance prefill-0" in message
    assert "unreachable" in message
    assert all_free(cluster)


def test_backpressure_refuses_admission_while_kv_waits(secret):
    pe = FakeEngine(Role.PREFILL)
    sender = make_sender("tcp", source=pe, secret=secret, instance_id="p", layout=pe.config.kv_layout(),
                         max_pending_tokens=200)
    server = InstanceServer(Role.PREFILL, pe, secret, sender=sender)
    server.start()
    try:
        for i in range(2):
            rec = Recorder()
            server.submit(request([3] * 90, RequestType.CONTEXT_ONLY, rid=f"b{i}"), rec)
            assert not rec.wait().errors
        rec = Recorder()
        server.submit(request([3] * 90, RequestType.CONTEXT_ONLY, rid="b2"), rec)
        kind, message = rec.wait().errors[0]
        assert kind is ErrorKind.OVERLOADED and "180 tokens" in message
        assert server.load().pending_kv_handoffs == 2
    finally:
        server.stop()
    assert pe.num_free_blocks == pe.num_total_blocks  # stop released the un-pulled KV


def test_cancelled_decode_stream_stops_and_frees_blocks(cluster):
    first = Recorder()
    prompt = [9] * 30
    cluster[Role.PREFILL].submit(request(prompt, RequestType.CONTEXT_ONLY, n=500), first)
    rec = Recorder()
    rec.cancelled.set()  # the client cancels before generation finishes
    cluster[Role.DECODE].submit(request(prompt, RequestType.GENERATION_ONLY, first.wait().handles[0], n=500), rec)
    kind, _ = rec.wait().errors[0]
    assert kind is ErrorKind.CANCELLED and rec.num_final == 1
    assert len(rec.tokens) < 499
    assert all_free(cluster)


def test_bad_engine_input_is_a_bad_request(cluster):
    rec = Recorder()
    cluster[Role.COLOCATED].submit(replace(request([1] * 300, RequestType.CONTEXT_AND_GENERATION)), rec)
    assert rec.wait().errors[0][0] is ErrorKind.BAD_REQUEST
    assert all_free(cluster)


def test_stop_fails_in_flight_requests(secret):
    server = InstanceServer(Role.COLOCATED, FakeEngine(Role.COLOCATED), secret)
    rec = Recorder()
    server.submit(request([4] * 10, RequestType.CONTEXT_AND_GENERATION, n=50), rec)  # loop not started
    server.stop()
    assert rec.wait().errors[0][0] is ErrorKind.SHUTTING_DOWN
    assert server.engine.shut_down and server.engine.num_free_blocks == server.engine.num_total_blocks


def test_iteration_log_has_one_line_per_engine_step(tiny_engines, secret, tmp_path):
    import json

    from trt_disagg.engine.llm_engine import LLMEngine

    log_path = tmp_path / "colocated-0.iterations.jsonl"
    server = InstanceServer(Role.COLOCATED, LLMEngine.from_engine_dir(tiny_engines[(1, 1)], threads_per_rank=1),
                            secret, iteration_log=log_path)
    server.start()
    try:
        rec = Recorder()
        server.submit(request(range(3, 40), RequestType.CONTEXT_AND_GENERATION, n=5), rec)
        assert len(rec.wait().tokens) == 5
    finally:
        server.stop()
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["prefill"] + ["decode"] * 4  # one prefill, then one step per token
    assert rows[0]["num_tokens"] == 37 and rows[1]["sum_context"] == 38
    assert all(r["duration_s"] > 0 and r["num_seqs"] == 1 for r in rows)
    assert [r["t"] for r in rows] == sorted(r["t"] for r in rows)


def test_decode_instance_logs_each_handoff_phase_by_phase(secret, tmp_path):
    import json

    pe = FakeEngine(Role.PREFILL, tp=2)
    sender = make_sender("tcp", source=pe, secret=secret, instance_id="prefill-0", layout=pe.config.kv_layout())
    log_path = tmp_path / "decode-0.iterations.jsonl"
    servers = {Role.PREFILL: InstanceServer(Role.PREFILL, pe, secret, sender=sender),
               Role.DECODE: InstanceServer(Role.DECODE, FakeEngine(Role.DECODE, pp=2), secret, transport="auto",
                                           iteration_log=log_path)}
    for s in servers.values():
        s.start()
    try:
        _, rest = disagg(servers, list(range(5, 45)), n=4, rid="req-7")
        assert not rest.errors and len(rest.tokens) == 3
    finally:
        for s in servers.values():
            s.stop()
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    [line] = [r for r in rows if r["kind"] == "handoff"]  # one line, at the request's first decode token
    assert line["request_id"] == "req-7" and line["num_tokens"] == 40
    phases = ("fetch_wait_s", "transfer_s", "connect_s", "meta_s", "data_s", "release_s", "source_export_s",
              "source_stage_s", "admit_s", "loop_wait_s", "import_s", "first_step_s", "send_s", "total_s")
    assert all(line[p] >= 0 for p in phases)
    assert line["total_s"] >= line["transfer_s"] + line["first_step_s"] - 1e-6
