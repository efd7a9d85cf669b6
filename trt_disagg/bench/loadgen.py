"""Async open-loop load generator against any OpenAI-compatible streaming `/v1/completions` endpoint.

    arrivals (Poisson / Gamma send times) ──▶ one task per request ──▶ POST /v1/completions, stream=true
                                                   │  SSE: data: {chunk} ... data: [DONE]
                                                   ▼
                                              RequestRecord (token receive times, usage, error)

Open loop, as in vLLM's and DistServe's benchmarks: a request is sent at its arrival time whether or not the
earlier ones have finished, so an overloaded server shows up as queueing (TTFT grows), not as a lower
send rate. Output lengths are fixed the `ignore_eos` way (vLLM's request fields `ignore_eos`, `min_tokens`,
plus `max_tokens`), so runs against different deployments do the same work.

A chunk is a token arrival when it carries a choice with non-empty text, or a choice that is not finished
(a token whose text is still empty, e.g. half a UTF-8 character); a trailing chunk that only says
`finish_reason` is not. The token count comes from `usage.completion_tokens` when the server sends it
(`stream_options.include_usage`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import numpy as np

from trt_disagg.bench.goodput import GoodputResult, SearchSpec, search_rates
from trt_disagg.bench.metrics import RequestRecord, RunResult
from trt_disagg.config import SLO
from trt_disagg.errors import UserError
from trt_disagg.workload import WorkloadRequest, make_arrivals

log = logging.getLogger(__name__)

# OpenAI's default, what clients that send no temperature (aiperf among them) are served with; 0 is greedy
OPENAI_DEFAULT_TEMPERATURE = 1.0

RecordCallback = Callable[[RequestRecord], None]
RunCallback = Callable[[float, int], None]  # (rate_rps, num_requests) when a run starts


def make_client(request_timeout_s: float = 300.0) -> httpx.AsyncClient:
    """A client with no connection cap (a capped pool would queue requests client-side and fake TTFT)."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(request_timeout_s, connect=10.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        trust_env=False,  # a benchmark measures the server, never a proxy in between
    )


async def check_endpoint(url: str, model: str | None = None, timeout_s: float = 5.0) -> str:
    """Fail fast with a UserError unless `url` serves the OpenAI API; returns the model name to use.

    GET /v1/models names the models (the first one is used when `model` is None); a server without it
    must at least answer GET /health, and then `model` is required.
    """
    base = url.rstrip("/")
    async with httpx.AsyncClient(timeout=timeout_s, trust_env=False) as client:
        try:
            resp = await client.get(f"{base}/v1/models")
        except httpx.HTTPError as exc:
            raise UserError(f"--url: router not reachable at {base} ({type(exc).__name__}: {exc})") from None
        if resp.status_code == 200:
            try:
                ids = [m["id"] for m in resp.json().get("data", [])]
            except (ValueError, KeyError, TypeError, AttributeError):
                raise UserError(f"--url: {base}/v1/models did not return an OpenAI model list") from None
            if model is None:
                if not ids:
                    raise UserError(f"--model: {base}/v1/models lists no model; name one with --model")
                return str(ids[0])
            if ids and model not in ids:
                raise UserError(f"--model: {model!r} is not served at {base} (served: {', '.join(ids)})")
            return model
        try:
            health = await client.get(f"{base}/health")
        except httpx.HTTPError as exc:
            raise UserError(f"--url: router not reachable at {base} ({type(exc).__name__}: {exc})") from None
        if health.status_code != 200:
            raise UserError(f"--url: {base} is not ready: GET /v1/models -> {resp.status_code}, "
                            f"GET /health -> {health.status_code}")
        if model is None:
            raise UserError(f"--model: {base} does not list its models; name one with --model")
        return model


async def preflight(url: str, model: str, req: WorkloadRequest, *, timeout_s: float = 120.0,
                    extra_body: dict[str, Any] | None = None,
                    temperature: float = OPENAI_DEFAULT_TEMPERATURE) -> RequestRecord:
    """Send one short request (one output token) the way the runs will; a UserError if it fails.

    Catches what `check_endpoint` cannot before a whole run is wasted: a server that rejects the body
    (e.g. no `ignore_eos` / `min_tokens` support, an unknown model, a prompt over its limit) or cannot
    serve yet. It also warms the deployment up.
    """
    short = WorkloadRequest(prompt=req.prompt, prompt_ids=req.prompt_ids, input_len=req.input_len, output_len=1)
    rec = RequestRecord(index=-1, input_len=req.input_len, expected_output_len=1, scheduled_s=0.0, sent_s=0.0)
    async with make_client(timeout_s) as client:
        await send_request(client, url, completion_body(model, short, extra_body, temperature=temperature), rec,
                           timeout_s)
    if not rec.ok:
        raise UserError(f"--url: the first request to {url.rstrip('/')}/v1/completions failed: {rec.error}")
    return rec


def completion_body(model: str, req: WorkloadRequest, extra_body: dict[str, Any] | None = None, *,
                    temperature: float = OPENAI_DEFAULT_TEMPERATURE) -> dict[str, Any]:
    """The request for one workload item: token ids when the workload has them, else the text.

    The temperature is always sent, so the server's default never decides what was measured; the default is
    OpenAI's (sampled), what most clients get, and 0 measures greedy decoding.
    """
    prompt: str | list[int]
    if req.prompt_ids is not None:
        prompt = list(req.prompt_ids)
    elif req.prompt is not None:
        prompt = req.prompt
    else:
        raise ValueError("workload request has neither prompt nor prompt_ids")
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": req.output_len,
        "min_tokens": req.output_len,
        "ignore_eos": True,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if extra_body:
        body.update(extra_body)
    return body


DONE = "[DONE]"


async def sse_data(resp: httpx.Response) -> AsyncIterator[str]:
    """The `data:` payloads of a server-sent-events response, in order (the last one is "[DONE]")."""
    async for line in resp.aiter_lines():
        if line.startswith("data:"):
            yield line[5:].strip()


async def send_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], rec: RequestRecord,
                       request_timeout_s: float) -> None:
    """Send one streaming completion and fill `rec` in; never raises for a server-side failure."""
    sent = time.perf_counter()
    usage_tokens: int | None = None
    chunk_tokens = 0
    done = False
    try:
        async with asyncio.timeout(request_timeout_s):
            async with client.stream("POST", f"{url.rstrip('/')}/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    rec.http_status = resp.status_code
                    rec.error = f"HTTP {resp.status_code}: {_error_message(text)}"
                    return
                async for data in sse_data(resp):
                    if data == DONE:
                        done = True
                        break
                    now = time.perf_counter() - sent
                    chunk = json.loads(data)
                    if rec.request_id is None and isinstance(chunk.get("id"), str):
                        rec.request_id = chunk["id"]
                    if "error" in chunk:
                        rec.error = f"error in stream: {_error_message(data)}"
                        return
                    if _is_token_chunk(chunk):
                        rec.token_times_s.append(now)
                        chunk_tokens += 1
                    usage = chunk.get("usage")
                    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                        usage_tokens = int(usage["completion_tokens"])
                    if isinstance(usage, dict) and usage.get("prompt_tokens") is not None:
                        rec.server_input_len = int(usage["prompt_tokens"])
    except TimeoutError:
        rec.error = f"timed out after {request_timeout_s:g} s"
    except httpx.HTTPError as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    except (ValueError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
        rec.error = f"malformed stream data: {exc}"
    finally:
        rec.end_s = time.perf_counter() - sent
        rec.output_tokens = usage_tokens if usage_tokens is not None else chunk_tokens
        if rec.error is None and not done:
            rec.error = "stream ended before data: [DONE]"
        if rec.error is None and not rec.token_times_s:
            rec.error = "stream had no tokens"


def _is_token_chunk(chunk: dict[str, Any]) -> bool:
    choices = chunk.get("choices")
    if not choices:
        return False
    choice = choices[0]
    return bool(choice.get("text")) or choice.get("finish_reason") is None


def _error_message(text: str) -> str:
    """The `error.message` of an OpenAI-style error body, else the text itself (shortened)."""
    try:
        obj = json.loads(text)
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    except ValueError:
        pass
    return text[:200]


async def run_at_rate(url: str, model: str, requests: Sequence[WorkloadRequest], arrivals: Sequence[float] | np.ndarray,
                      slo: SLO, *, rate_rps: float | None = None, arrival: str = "poisson",
                      request_timeout_s: float = 300.0, max_duration_s: float | None = None,
                      on_record: RecordCallback | None = None, client: httpx.AsyncClient | None = None,
                      extra_body: dict[str, Any] | None = None,
                      temperature: float = OPENAI_DEFAULT_TEMPERATURE) -> RunResult:
    """Send `requests[i]` at `arrivals[i]` seconds after the start; wait for every stream; return the run.

    Bounded in count (len(requests)) and in time: no request is sent after `max_duration_s`, and each
    request gives up after `request_timeout_s` (recorded as failed). `rate_rps` labels the run (default:
    requests / last arrival time).
    """
    times = np.asarray(arrivals, dtype=np.float64)
    if len(times) != len(requests):
        raise ValueError(f"{len(requests)} requests but {len(times)} arrival times")
    if len(times) == 0:
        raise UserError("--num-requests: a run needs at least one request")
    if np.any(times < 0) or np.any(np.diff(times) < 0):
        raise ValueError("arrival times must be non-negative and sorted")
    if max_duration_s is not None:
        times = times[times <= max_duration_s]
        if len(times) == 0:
            raise UserError(f"--duration: {max_duration_s} s ends before the first arrival")
    if rate_rps is None:
        rate_rps = len(times) / float(times[-1]) if times[-1] > 0 else float("inf")
    own_client = client is None
    http = client if client is not None else make_client(request_timeout_s)
    records: list[RequestRecord] = []
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()

    async def one(rec: RequestRecord, body: dict[str, Any]) -> None:
        await send_request(http, url, body, rec, request_timeout_s)
        if on_record is not None:
            on_record(rec)

    try:
        for i, t in enumerate(times):
            while (delay := start + float(t) - time.perf_counter()) > 0:
                await asyncio.sleep(delay)  # pacing the open-loop arrival process, not synchronisation
            req = requests[i]
            rec = RequestRecord(index=i, input_len=req.input_len, expected_output_len=req.output_len,
                                scheduled_s=float(t), sent_s=time.perf_counter() - start)
            records.append(rec)
            task = asyncio.create_task(one(rec, completion_body(model, req, extra_body, temperature=temperature)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if own_client:
            await http.aclose()
    duration = time.perf_counter() - start
    failed = sum(not r.ok for r in records)
    if failed:
        log.warning("rate %.3g/s: %d of %d requests failed (first: %s)", rate_rps, failed, len(records),
                    next(r.error for r in records if not r.ok))
    short = sum(r.ok and r.output_tokens < r.expected_output_len for r in records)
    if short:
        log.warning("rate %.3g/s: %d requests got fewer tokens than max_tokens: the server does not honour "
                    "ignore_eos/min_tokens, so runs do not compare", rate_rps, short)
    return RunResult(rate_rps=rate_rps, arrival=arrival, slo=slo, records=records, duration_s=duration)


async def run_rates(url: str, model: str, requests: Sequence[WorkloadRequest], rates: Sequence[float],
                    slo: SLO, *, arrival: str = "poisson", cv: float = 1.0, seed: int = 0,
                    on_run: RunCallback | None = None, **run_kwargs: Any) -> list[RunResult]:
    """One run per rate, in order, each with arrivals drawn by `make_arrivals` with the same seed."""
    results = []
    for rate in rates:
        results.append(await _run_one_rate(url, model, requests, rate, slo, arrival, cv, seed, on_run,
                                           run_kwargs))
    return results


async def search_goodput(url: str, model: str, requests: Sequence[WorkloadRequest], slo: SLO, *,
                         spec: SearchSpec | None = None, num_cores: int = 1, arrival: str = "poisson",
                         cv: float = 1.0, seed: int = 0, on_run: RunCallback | None = None,
                         **run_kwargs: Any) -> GoodputResult:
    """Goodput of the deployment behind `url`: the highest rate with attainment >= slo.attainment.

    `spec.target` defaults to the SLO's attainment; every probe is a full `run_at_rate` over `requests`.
    """
    if num_cores < 1:
        raise UserError(f"--cores must be >= 1, got {num_cores}")
    spec = spec if spec is not None else SearchSpec(target=slo.attainment)
    runs: list[RunResult] = []

    async def measure(rate: float) -> float:
        result = await _run_one_rate(url, model, requests, rate, slo, arrival, cv, seed, on_run, run_kwargs)
        runs.append(result)
        return result.summary().attainment

    trace = await search_rates(measure, spec)
    return GoodputResult(target=spec.target, goodput_rps=trace.goodput_rps, num_cores=num_cores, runs=runs)


async def _run_one_rate(url: str, model: str, requests: Sequence[WorkloadRequest], rate: float, slo: SLO,
                        arrival: str, cv: float, seed: int, on_run: RunCallback | None,
                        run_kwargs: dict[str, Any]) -> RunResult:
    arrivals = make_arrivals(arrival, rate, len(requests), seed=seed, cv=cv)
    if on_run is not None:
        max_duration_s = run_kwargs.get("max_duration_s")
        num_sent = len(requests) if max_duration_s is None else int(np.sum(arrivals <= max_duration_s))
        on_run(rate, num_sent)
    log.info("run at %.4g req/s: %d requests, %s arrivals", rate, len(requests), arrival)
    return await run_at_rate(url, model, requests, arrivals, slo, rate_rps=rate, arrival=arrival, **run_kwargs)
