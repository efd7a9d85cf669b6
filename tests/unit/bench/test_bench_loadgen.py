"""The load generator against a fake OpenAI-compatible SSE server (FastAPI + uvicorn on 127.0.0.1).

The server's delays are lower bounds the client cannot beat (it cannot see a token before the server sent
it), so the assertions on times below are causal bounds, not speed targets.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest

from trt_disagg.bench.fake_openai import MODEL, FakeServer
from trt_disagg.bench.goodput import SearchSpec
from trt_disagg.bench.loadgen import (
    check_endpoint,
    completion_body,
    preflight,
    run_at_rate,
    run_rates,
    search_goodput,
)
from trt_disagg.bench.metrics import attainment, attains, tpot_s, ttft_s
from trt_disagg.config import SLO
from trt_disagg.errors import UserError
from trt_disagg.workload import WorkloadRequest

pytestmark = pytest.mark.slow

LOOSE = SLO(ttft_s=60.0, tpot_s=60.0, attainment=0.9)


def text_request(prompt: str, output_len: int) -> WorkloadRequest:
    return WorkloadRequest(prompt=prompt, prompt_ids=None, input_len=4, output_len=output_len)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_body_uses_token_ids_when_present_and_fixes_the_output_length() -> None:
    body = completion_body("m", WorkloadRequest(prompt="hi", prompt_ids=[5, 6, 7], input_len=3, output_len=9))
    assert body["prompt"] == [5, 6, 7]
    assert (body["max_tokens"], body["min_tokens"], body["ignore_eos"]) == (9, 9, True)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert completion_body("m", text_request("hello", 2))["prompt"] == "hello"


async def test_records_tokens_failures_and_one_token_requests(fake_server: FakeServer) -> None:
    fake_server.behaviour.ttft_delay_s = 0.02
    fake_server.behaviour.tpot_delay_s = 0.005
    requests = [
        text_request("normal", 4),
        text_request("one", 1),
        text_request("fail-http", 4),
        text_request("fail-stream", 5),
        text_request("drop", 5),
        WorkloadRequest(prompt="ids", prompt_ids=[1, 2, 3], input_len=3, output_len=3),
        text_request("multi", 4),
    ]
    arrivals = np.linspace(0.0, 0.03, len(requests))
    seen: list[int] = []
    run = await run_at_rate(fake_server.url, MODEL, requests, arrivals, LOOSE, rate_rps=200.0,
                            on_record=lambda r: seen.append(r.index))
    normal, one, fail_http, fail_stream, drop, ids, multi = run.records
    assert sorted(seen) == list(range(7)) and [r.index for r in run.records] == list(range(7))

    assert normal.ok and normal.output_tokens == 4 and len(normal.token_times_s) == 4
    ttft = ttft_s(normal)
    assert ttft is not None and ttft >= 0.02
    assert normal.end_s is not None and normal.end_s >= 0.02 + 3 * 0.005
    assert tpot_s(normal) is not None

    assert one.ok and one.output_tokens == 1 and tpot_s(one) is None and attains(one, LOOSE)

    assert fail_http.error == "HTTP 500: engine exploded"
    assert fail_stream.error == "error in stream: decode instance lost"
    assert len(fail_stream.token_times_s) == 2 and not attains(fail_stream, LOOSE)
    assert drop.error == "stream ended before data: [DONE]"

    assert ids.ok and ids.output_tokens == 3
    assert multi.ok and multi.output_tokens == 4 and len(multi.token_times_s) == 2  # count from usage

    assert attainment(run.records, LOOSE) == pytest.approx(4 / 7)
    assert run.summary().num_failed == 3

    bodies = {str(b["prompt"]): b for b in fake_server.behaviour.bodies}
    assert bodies["[1, 2, 3]"]["prompt"] == [1, 2, 3]
    assert bodies["normal"]["ignore_eos"] is True and bodies["normal"]["min_tokens"] == 4
    assert all(b["model"] == MODEL for b in bodies.values())


async def test_sends_in_arrival_order_and_bounds_by_duration(fake_server: FakeServer) -> None:
    requests = [text_request(f"r{i}", 2) for i in range(6)]
    arrivals = np.array([0.0, 0.01, 0.02, 0.03, 5.0, 6.0])
    run = await run_at_rate(fake_server.url, MODEL, requests, arrivals, LOOSE, max_duration_s=1.0)
    assert [r.index for r in run.records] == [0, 1, 2, 3]  # the last two would arrive after 1 s
    assert all(r.sent_s >= r.scheduled_s for r in run.records)
    assert [b["prompt"] for b in fake_server.behaviour.bodies] == ["r0", "r1", "r2", "r3"]


async def test_request_timeout_is_a_failure(fake_server: FakeServer) -> None:
    fake_server.behaviour.ttft_delay_s = 2.0
    run = await run_at_rate(fake_server.url, MODEL, [text_request("slow", 2)], [0.0], LOOSE,
                            request_timeout_s=0.1)
    assert run.records[0].error == "timed out after 0.1 s"


async def test_unreachable_server_fails_every_request_not_the_run() -> None:
    run = await run_at_rate(closed_port_url(), MODEL, [text_request("x", 2)] * 2, [0.0, 0.0], LOOSE)
    assert all(r.error is not None and "Connect" in r.error for r in run.records)
    assert run.summary().attainment == 0.0


async def test_run_rates_draws_arrivals_per_rate(fake_server: FakeServer) -> None:
    requests = [text_request(f"r{i}", 2) for i in range(4)]
    started: list[tuple[float, int]] = []
    runs = await run_rates(fake_server.url, MODEL, requests, [50.0, 100.0], LOOSE,
                           on_run=lambda rate, n: started.append((rate, n)))
    assert [r.rate_rps for r in runs] == [50.0, 100.0]
    assert started == [(50.0, 4), (100.0, 4)]
    # same seed, rate doubled: every arrival time halves
    assert [r.scheduled_s for r in runs[1].records] == pytest.approx([r.scheduled_s / 2 for r in runs[0].records])


async def test_search_goodput_expands_while_attaining(fake_server: FakeServer) -> None:
    requests = [text_request(f"r{i}", 2) for i in range(4)]
    result = await search_goodput(fake_server.url, MODEL, requests, LOOSE, num_cores=2,
                                  spec=SearchSpec(target=0.9, start_rps=20.0, max_runs=3))
    assert [r.rate_rps for r in result.runs] == [20.0, 40.0, 80.0]
    assert result.goodput_rps == 80.0 and result.per_core_goodput_rps == 40.0


async def test_search_goodput_is_zero_when_every_request_fails(fake_server: FakeServer) -> None:
    requests = [text_request("fail-http", 2)] * 3
    result = await search_goodput(fake_server.url, MODEL, requests, LOOSE,
                                  spec=SearchSpec(target=0.9, start_rps=40.0, max_runs=3))
    assert [r.rate_rps for r in result.runs] == [40.0, 20.0, 10.0]
    assert result.goodput_rps == 0.0


async def test_check_endpoint(fake_server: FakeServer) -> None:
    assert await check_endpoint(fake_server.url) == MODEL
    assert await check_endpoint(fake_server.url + "/", MODEL) == MODEL
    with pytest.raises(UserError, match="--model: 'other' is not served"):
        await check_endpoint(fake_server.url, "other")
    fake_server.behaviour.serve_models = False  # only /health: the model must be named
    assert await check_endpoint(fake_server.url, "any") == "any"
    with pytest.raises(UserError, match="--model"):
        await check_endpoint(fake_server.url)
    with pytest.raises(UserError, match="--url: router not reachable"):
        await check_endpoint(closed_port_url())


async def test_preflight_sends_one_short_request_and_rejects_failures(fake_server: FakeServer) -> None:
    rec = await preflight(fake_server.url, MODEL, text_request("hello", 50))
    assert rec.ok and rec.output_tokens == 1
    assert fake_server.behaviour.bodies[-1]["max_tokens"] == 1
    with pytest.raises(UserError, match="first request .* failed: HTTP 500: engine exploded"):
        await preflight(fake_server.url, MODEL, text_request("fail-http", 50))
