"""The client side of benchmarks/chaos.py: greedy streaming requests classified as the chaos table counts
them, the registry and readiness checks a recovery waits on, the overload burst and the oversized inputs."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from router.admission import RETRY_COUNT_HEADER, quantile_of
from trt_disagg.bench.loadgen import DONE, sse_data
from trt_disagg.contract import Role
from trt_disagg.registry_read import list_instances
from trt_disagg.triton.cluster import LocalCluster

PROMPTS = [f"Chaos {i}: the number {13 * i + 7} is" for i in range(8)]
OUTCOMES = ("ok", "clear error", "hung", "lost", "mismatch")


@dataclass
class Outcome:
    phase: str
    kind: str  # one of OUTCOMES
    detail: str = ""
    ttft_s: float | None = None
    retry_after_s: float | None = None  # a 429's `retry-after-ms` (else its Retry-After), in seconds
    retry_after_header_s: int | None = None  # its Retry-After: whole seconds (RFC 9110)
    sent_at: float = 0.0
    answered_at: float | None = None  # when the status line came back

    @property
    def heard_at(self) -> float:
        """When the client had its answer: the status line, or its send when none came."""
        return self.answered_at if self.answered_at is not None else self.sent_at


@dataclass
class FaultResult:
    name: str
    recovery_s: float
    counts: dict[str, int] = field(default_factory=dict)


class Load:
    """Closed-loop clients streaming greedy completions; each outcome labelled with the phase it began in."""

    def __init__(self, url: str, reference: dict[str, str], args: argparse.Namespace) -> None:
        self.url, self.reference, self.args = url, reference, args
        self.phase = "steady"
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()

    async def run(self, clients: int) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.args.request_timeout_s, connect=5.0)) as http:
            await asyncio.gather(*(self._client(http, i) for i in range(clients)))

    def stop(self) -> None:
        self._stop.set()

    async def _client(self, http: httpx.AsyncClient, i: int) -> None:
        rng = random.Random(i)
        while not self._stop.is_set():
            prompt = rng.choice(PROMPTS)
            outcome = await one_request(http, self.url, prompt, self.args, self.reference, self.phase)
            self.outcomes.append(outcome)
            if outcome.kind == "clear error":
                await asyncio.sleep(0.2)  # a client backs off after an error instead of spinning


async def one_request(http: httpx.AsyncClient, url: str, prompt: str, args: argparse.Namespace,
                      reference: dict[str, str] | None, phase: str) -> Outcome:
    body = {"model": "chaos", "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "stream": True}
    sent = time.monotonic()
    out = Outcome(phase, "lost", sent_at=sent)
    text, done, error = [], False, None
    try:
        async with asyncio.timeout(args.request_timeout_s):
            async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    out.kind, out.detail = "clear error", f"HTTP {resp.status_code}"
                    if "retry-after" in resp.headers:
                        out.retry_after_header_s = int(resp.headers["retry-after"])
                    if "retry-after-ms" in resp.headers:
                        out.retry_after_s = float(resp.headers["retry-after-ms"]) / 1000
                    elif "retry-after" in resp.headers:
                        out.retry_after_s = float(resp.headers["retry-after"])
                    return out
                async for data in sse_data(resp):
                    if data == DONE:
                        done = True
                    else:
                        chunk = json.loads(data)
                        if "error" in chunk:
                            error = chunk["error"].get("code")
                        elif chunk["choices"][0]["text"]:
                            out.ttft_s = out.ttft_s if out.ttft_s is not None else time.monotonic() - sent
                            text.append(chunk["choices"][0]["text"])
    except TimeoutError:
        out.kind = "hung"
        return out
    except (httpx.ConnectError, httpx.ConnectTimeout):
        out.kind, out.detail = "clear error", "connection refused"
        return out
    except httpx.HTTPError as exc:
        out.detail = type(exc).__name__
        return out  # lost: cut without [DONE]
    if not done:
        return out
    if error is not None:
        out.kind, out.detail = "clear error", f"SSE {error}"
    elif reference is not None and "".join(text) != reference[prompt]:
        out.kind, out.detail = "mismatch", "".join(text)
    else:
        out.kind = "ok"
    return out


async def registered(redis_url: str, role: Role) -> set[str]:
    client = aioredis.from_url(redis_url, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        return {i.instance_id for i in await list_instances(client, role)}
    except (OSError, aioredis.RedisError):
        return set()
    finally:
        await client.aclose()


async def until(predicate, timeout_s: float, what: str) -> float:
    """Seconds until the async `predicate` holds (polling another process's state)."""
    t0 = time.monotonic()
    while not await predicate():
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"{what}: not within {timeout_s:.0f}s")
        await asyncio.sleep(0.1)
    return time.monotonic() - t0


def pid_of(cluster: LocalCluster, instance_id: str) -> int:
    proc = next(p for p in cluster.processes if p.instance_id == instance_id).proc
    assert proc is not None
    return proc.pid


# ---- overload ---------------------------------------------------------------------------------------------


LONG = "Overload " + "word " * 180  # a long prompt: the burst loads the prefill instance


async def capacity_rps(url: str, args: argparse.Namespace) -> float:
    """Requests/s of long prompts the deployment completes with many clients (its prefill capacity)."""
    done: list[Outcome] = []
    end = time.monotonic() + args.capacity_s

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < end:
            done.append(await one_request(http, url, LONG, args_with(args, max_tokens=2), None, "capacity"))

    async with httpx.AsyncClient(timeout=60) as http:
        await asyncio.gather(*(client(http) for _ in range(16)))
    return sum(1 for o in done if o.kind == "ok") / args.capacity_s


def args_with(args: argparse.Namespace, **changes: object) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


DRAIN_TOLERANCE_S = 0.1
PROBE_GAP_S = 0.02  # after the burst: the resolution of "when did the router admit again"


async def lean_request(url: str, body: bytes, phase: str, retry_count: int | None = None) -> Outcome:
    """One streaming completion over a bare socket (HTTP/1.1, read until [DONE]): the burst's client. At ~100
    requests/s an httpx client takes enough of the 2 cores to delay its own sends and readings by seconds, so
    TTFT and the arrival times would describe the client, not the router. Counted as `one_request` counts.
    With `retry_count`, it says as OpenAI's SDKs do how many times it sent this request before
    (`x-stainless-retry-count`); without, it says nothing, as curl or a load generator."""
    host, port = url.removeprefix("http://").split(":")
    sent = time.monotonic()
    out = Outcome(phase, "lost", sent_at=sent)
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        out.kind, out.detail = "clear error", "connection refused"
        return out
    try:
        said = b"" if retry_count is None else f"{RETRY_COUNT_HEADER}: {retry_count}\r\n".encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Type: "
                     b"application/json\r\nConnection: close\r\n" + said + b"Content-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        status = int((await reader.readline()).split()[1])
        out.answered_at = time.monotonic()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 200:
            out.kind, out.detail = "clear error", f"HTTP {status}"
            if "retry-after" in headers:
                out.retry_after_header_s = int(headers["retry-after"])
                out.retry_after_s = float(headers.get("retry-after-ms", 1000 * out.retry_after_header_s)) / 1000
            return out
        async for line in reader:  # the 200 went out with the first token: the request was admitted
            if line.startswith(b"data: ") and out.ttft_s is None:
                out.ttft_s = time.monotonic() - sent
            if line.startswith(b"data: [DONE]"):
                out.kind = "ok"
            elif b'"error"' in line:
                out.kind, out.detail = "clear error", "SSE error"
    except (OSError, ValueError, IndexError) as exc:
        out.detail = type(exc).__name__
    finally:
        writer.close()
    return out


async def burst(url: str | Sequence[str], rate_rps: float, args: argparse.Namespace, capacity_rps: float) -> dict:
    """Open-loop Poisson arrivals at `rate_rps` for burst_s, then one probe every PROBE_GAP_S (while the
    burst's admitted requests are still running) until the router admits one: every 429 has a next
    admission, seen at the resolution of the arrivals, to measure its Retry-After against. Several router
    URLs take the arrivals in turn (as a load balancer would); the probes go to the first."""
    urls = [url] if isinstance(url, str) else list(url)
    rng = random.Random(0)
    body = json.dumps({"model": "chaos", "prompt": LONG, "max_tokens": 2, "temperature": 0,
                       "stream": True}).encode()
    tasks = []
    start = next_s = time.monotonic()
    end = start + args.burst_s
    while next_s < end:
        tasks.append(asyncio.create_task(lean_request(urls[len(tasks) % len(urls)], body, "burst")))
        # Poisson arrivals on a fixed schedule: a busy event loop sends late, not fewer
        next_s += rng.expovariate(rate_rps)
        await asyncio.sleep(max(0.0, next_s - time.monotonic()))
    probes = []
    while (probe := await lean_request(urls[0], body, "probe")).retry_after_s is not None:
        probes.append(probe)
        if time.monotonic() - end > 120:
            raise RuntimeError("the router admitted nothing for 120 s after the burst")
        await asyncio.sleep(PROBE_GAP_S)
    outcomes = list(await asyncio.gather(*tasks)) + probes + [probe]
    for o in outcomes:
        o.sent_at -= start
        o.answered_at = None if o.answered_at is None else o.answered_at - start
    return overload_summary(outcomes, rate_rps, args.ttft_slo_s, capacity_rps)


def backlog_drain_s(admitted: list[Outcome], at_s: float, target_s: float, capacity_rps: float) -> float | None:
    """When the work admitted before `at_s` has drained to the target: a request sent `d` later, with nothing
    admitted in between, gets its first token one request's service time (1 / capacity) after the last of
    that work's, i.e. exactly at the target when d = that moment - at_s - target. This is what the router's
    Retry-After announces (router/admission.py), measured from the first tokens the clients saw."""
    firsts = [a.sent_at + a.ttft_s for a in admitted if a.sent_at <= at_s and a.ttft_s is not None]
    if not firsts:
        return None
    return max(0.0, max(firsts) + 1 / capacity_rps - at_s - target_s)


def agrees(announced_s: float, drain_s: float) -> bool:
    """Within 2x of the drain, or within DRAIN_TOLERANCE_S of it: a client cannot act on less (its own
    round trip, a timer's resolution), and Retry-After has whole seconds."""
    return 0.5 * drain_s - DRAIN_TOLERANCE_S <= announced_s <= 2 * drain_s + DRAIN_TOLERANCE_S


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile of xs (nearest rank below), None for none."""
    return quantile_of(sorted(xs), q) if xs else None


def overload_summary(outcomes: list[Outcome], rate_rps: float, target_s: float, capacity_rps: float) -> dict:
    """Admitted TTFT p90 vs the target; for each 429, what it announced (`retry-after-ms`) vs its actual drain
    time: from the moment the client had the 429 until the router admitted a request sent after that moment
    (the earliest a client coming back could have been admitted). Coming back at the announced time, it finds
    the router admitting if the ratio is >= 1, and has waited ratio x as long as it had to. The same measured
    from the 429's request (`*_from_send`) charges the announcement with the time the router took to answer."""
    by_time = sorted(outcomes, key=lambda o: o.sent_at)
    admitted = [o for o in by_time if o.kind == "ok"]
    ttfts = sorted(o.ttft_s for o in admitted if o.ttft_s is not None)

    def drain_s(t: float) -> float | None:
        nxt = next((a.sent_at for a in admitted if a.sent_at >= t), None)
        return None if nxt is None else nxt - t

    refusals = []  # (sent at, answered at, announced s, Retry-After s, drain s from the answer, from the send)
    for o in (o for o in by_time if o.retry_after_s is not None):
        answered_at = o.heard_at
        drain, drain_from_send = drain_s(answered_at), drain_s(o.sent_at)
        if drain is not None and drain_from_send is not None and o.retry_after_s is not None:
            refusals.append((round(o.sent_at, 4), round(answered_at, 4), o.retry_after_s,
                             o.retry_after_header_s or 0, round(drain, 4), round(drain_from_send, 4)))
    # the same 429s against the backlog they were refused for (backlog_drain_s)
    backlog = [(r, b) for _, t, r, _, _, _ in refusals
               if (b := backlog_drain_s(admitted, t, target_s, capacity_rps)) is not None]
    backlog_ok = [agrees(r, b) for r, b in backlog]
    next_ok = [agrees(r, d) for _, _, r, _, d, _ in refusals]
    ratios = [r / max(0.001, d) for _, _, r, _, d, _ in refusals]
    from_send = [r / max(0.001, d) for _, _, r, _, _, d in refusals]
    whole_s = [h / max(0.001, d) for _, _, _, h, d, _ in refusals]
    # the first request sent once a 429's retry-after-ms had passed: admitted? (a client coming back then
    # competes with every other arrival: under sustained overload only some get in)
    back = [b for _, t, r, _, _, _ in refusals
            if (b := next((a.kind == "ok" for a in by_time if a.sent_at >= t + r), None)) is not None]

    def within_2x(xs: list[float]) -> float | None:
        return sum(1 for x in xs if 0.5 <= x <= 2.0) / len(xs) if xs else None

    return {"rate_rps": rate_rps, "sent": len(outcomes), "admitted": len(admitted),
            "refused_429": sum(1 for o in outcomes if o.retry_after_s is not None),
            "admitted_ttft_p90_s": pct(ttfts, 0.9), "ttft_target_s": target_s,
            "admitted_ttft_p50_s": pct(ttfts, 0.5),
            "admitted_within_target": sum(1 for t in ttfts if t <= target_s) / len(ttfts) if ttfts else None,
            "retry_after_over_drain_p50": pct(ratios, 0.5), "retry_after_over_drain_p10": pct(ratios, 0.1),
            "retry_after_over_drain_p90": pct(ratios, 0.9), "retry_after_within_2x": within_2x(ratios),
            "retry_after_within_2x_or_tolerance": sum(next_ok) / len(next_ok) if next_ok else None,
            "retry_after_over_drain_from_send_p50": pct(from_send, 0.5),
            "retry_after_within_2x_from_send": within_2x(from_send),
            "retry_after_whole_s_over_drain_p50": pct(whole_s, 0.5),
            "back_at_retry_after_admitted": sum(back) / len(back) if back else None,
            "announced_p50_s": pct([r for _, _, r, _, _, _ in refusals], 0.5),
            "drain_p50_s": pct([d for _, _, _, _, d, _ in refusals], 0.5),
            **{f"backlog_drain_p{q}_s": pct([b for _, b in backlog], q / 100) for q in (10, 50, 90)},
            **{f"retry_after_minus_backlog_p{q}_s": pct([r - b for r, b in backlog], q / 100) for q in (10, 50, 90)},
            "retry_after_within_2x_of_backlog": sum(backlog_ok) / len(backlog_ok) if backlog_ok else None,
            "refusals": refusals,
            "admitted_sent_at_ttft_s": [[round(o.sent_at, 4), round(o.ttft_s, 4)] for o in admitted
                                        if o.ttft_s is not None],
            "other": dict(Counter(o.kind for o in outcomes if o.retry_after_s is None and o.kind != "ok"))}


# ---- oversized input ----------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def oversized(cluster: LocalCluster) -> dict:
    """A 100 MB upload declared up front (refused from its header); a chunked upload trickling past the body
    limit while /health is polled; then a 10 MB prompt: the statuses, the slowest /health answer meanwhile,
    and the router's RSS before and after."""
    assert cluster.router_proc is not None and cluster.router_url is not None
    pid, url = cluster.router_proc.pid, cluster.router_url
    host, port = url.removeprefix("http://").split(":")
    before_mb = rss_mb(pid)
    declared = await upload(host, int(port), f"Content-Length: {100 << 20}", chunks=0)
    health_s: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:

        async def poll_health() -> None:
            t0 = time.monotonic()
            await http.get("/health")
            health_s.append(time.monotonic() - t0)

        chunked = await upload(host, int(port), "Transfer-Encoding: chunked", chunks=400, between=poll_health)
        prompt = await http.post("/v1/completions", json={"model": "chaos", "prompt": "x" * (10 << 20),
                                                           "max_tokens": 2})
    return {"upload_100mb": declared, "upload_chunked": chunked, "health_max_ms": 1000 * max(health_s, default=0.0),
            "health_polls": len(health_s), "prompt_10mb": prompt.status_code, "rss_before_mb": before_mb,
            "rss_after_mb": rss_mb(pid)}


async def upload(host: str, port: int, length_header: str, chunks: int, between=None) -> str:
    """POST a body of `chunks` x 64 KiB (chunked encoding) or only headers; the status line the router sent.
    The answer is read as it arrives: the router may answer, and close, long before the body is sent."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"{length_header}\r\n\r\n".encode())
    answer = asyncio.ensure_future(reader.readline())
    try:
        for _ in range(chunks):
            if answer.done():
                break
            try:
                writer.write(b"10000\r\n" + b" " * 0x10000 + b"\r\n")
                await writer.drain()
            except (ConnectionError, OSError):
                break  # the router answered and closed: the rest of the body is not wanted
            if between is not None:
                await between()
        try:
            return (await asyncio.wait_for(answer, timeout=10)).decode().strip()
        except (ConnectionError, OSError, TimeoutError) as exc:
            return f"no answer ({type(exc).__name__})"
    finally:
        writer.close()
