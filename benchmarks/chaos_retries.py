"""The overload burst again, with clients that do what the OpenAI SDKs do with a 429: come back after its
`retry-after-ms` (when it is within two minutes), at most twice, then give up. It shows what the announcement does
to the service when clients act on it: whether the admitted requests still meet the target, how many clients
are served in the end, and how much extra load the retries add."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.chaos_client import LONG, Outcome, agrees, lean_request, pct
from router.admission import HONOURED_RETRY_AFTER_S  # the SDK sleeps what `retry-after-ms` says up to this

MAX_RETRIES = 2  # openai-python's default `max_retries`


@dataclass
class Client:
    """One caller: its attempts, first to last."""

    started_at: float
    attempts: list[Outcome] = field(default_factory=list)

    @property
    def first_token_at(self) -> float | None:
        """When its last attempt had its first token; None unless it was served."""
        last = self.attempts[-1]
        return last.sent_at + last.ttft_s if last.kind == "ok" and last.ttft_s is not None else None


async def router_gauge(url: str, name: str) -> float:
    """The largest sample of one of the router's /metrics gauges (0 when it has none)."""
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"{url}/metrics")).raise_for_status().text
    return max((s.value for family in text_string_to_metric_families(text)
                if family.name == name for s in family.samples), default=0.0)


async def retry_queue_s(url: str) -> float:
    """The longest wait, over the router's pools, until the clients it refused will have had the places their
    Retry-After gave them (clients that never come back hold theirs only as long as the router still expects
    them: /metrics trtd_router_retry_return_share)."""
    return await router_gauge(url, "trtd_router_retry_queue_seconds")


async def return_share(url: str) -> float:
    """The share of its refused clients the router has seen come back for their places."""
    return await router_gauge(url, "trtd_router_retry_return_share")


async def retry_queue_empty(url: str) -> bool:
    return await retry_queue_s(url) <= 0.0


async def retrying_client(urls: Iterator[str], body: bytes) -> Client:
    """One caller; each attempt goes to the next of `urls` (one router, or several behind a load balancer that
    takes turns: a retry may reach another router than the one that refused it)."""
    client = Client(time.monotonic())
    for retry_count in range(1 + MAX_RETRIES):  # sent as the SDK sends it: the router paces by it
        attempt = await lean_request(next(urls), body, "retrying burst", retry_count)
        client.attempts.append(attempt)
        wait_s = attempt.retry_after_s
        if wait_s is None or not 0 < wait_s <= HONOURED_RETRY_AFTER_S:
            break  # served, a failure other than 429, or an announcement the SDK would not sleep on
        await asyncio.sleep(wait_s)
    return client


async def retrying_burst(url: str | Sequence[str], rate_rps: float, args: argparse.Namespace,
                         capacity_rps: float) -> dict:
    """Poisson arrivals of new clients at `rate_rps` for burst_s (the same schedule as the plain burst), each
    retrying its 429s as above; several router URLs take the attempts in turn, as a load balancer would."""
    urls = itertools.cycle([url] if isinstance(url, str) else list(url))
    rng = random.Random(0)
    body = json.dumps({"model": "chaos", "prompt": LONG, "max_tokens": 2, "temperature": 0,
                       "stream": True}).encode()
    tasks = []
    next_s = time.monotonic()
    end = next_s + args.burst_s
    while next_s < end:
        tasks.append(asyncio.create_task(retrying_client(urls, body)))
        next_s += rng.expovariate(rate_rps)
        await asyncio.sleep(max(0.0, next_s - time.monotonic()))
    return retry_summary(list(await asyncio.gather(*tasks)), rate_rps, args.ttft_slo_s, capacity_rps)


def drains_of_work_ahead(clients: list[Client]) -> list[tuple[float, float]]:
    """(announced, actual) for every 429: actual = from the client having it until every client that began
    before this one and was served had its first token (the work ahead of it drained; 0 if already)."""
    pairs, ahead_done = [], float("-inf")
    for c in sorted(clients, key=lambda c: c.started_at):
        for a in c.attempts:
            if a.retry_after_s is not None:
                pairs.append((a.retry_after_s, max(0.0, ahead_done - a.heard_at)))
        if (t := c.first_token_at) is not None:
            ahead_done = max(ahead_done, t)
    return pairs


def drains_of_work_ahead_as_served(clients: list[Client]) -> list[tuple[float, float]]:
    """(announced, actual) for every 429: actual = from the client having it until the pool had given as many
    more first tokens as there were clients ahead of it then (served clients that began before it and had no
    first token yet), to whichever clients: the work ahead at the pace it was served. Unlike
    drains_of_work_ahead, one client ahead that the pool reached late (a new arrival took its room, it was
    refused again and went to the end) does not stretch the drain of everyone behind it."""
    served = [(c.started_at, t) for c in clients if (t := c.first_token_at) is not None]
    first_tokens = sorted(t for _, t in served)
    pairs = []
    for c in clients:
        for a in c.attempts:
            if a.retry_after_s is None:
                continue
            answered = a.heard_at
            ahead = sum(1 for began, t in served if began < c.started_at and t > answered)
            done = bisect_right(first_tokens, answered)
            pairs.append((a.retry_after_s, first_tokens[done + ahead - 1] - answered if ahead else 0.0))
    return pairs


def retry_summary(clients: list[Client], rate_rps: float, target_s: float, capacity_rps: float) -> dict:
    """Per client: served or not, after how many attempts, and its time to first token from its first send
    (what its caller waited, retries included); per admitted attempt: its own TTFT against the target. And
    the pool's pace over the whole run (the first send to the last first token) against its measured
    capacity: clients that obey a Retry-After longer than needed leave the pool idle, which the drain of the
    work ahead of them (they all came late) cannot show."""
    served = [c for c in clients if c.attempts[-1].kind == "ok"]
    admitted_ttft = sorted(a.ttft_s for c in served for a in c.attempts[-1:] if a.ttft_s is not None)
    first_tokens = [(c.started_at, t) for c in served if (t := c.first_token_at) is not None]
    caller_ttft = [t - began for began, t in first_tokens]
    attempts = sum(len(c.attempts) for c in clients)
    last_first_token = max((t for _, t in first_tokens), default=None)
    span_s = None if last_first_token is None else last_first_token - min(c.started_at for c in clients)
    retries = [a for c in clients for a in c.attempts[1:]]
    drains = drains_of_work_ahead(clients)
    as_served = drains_of_work_ahead_as_served(clients)
    announced = [a.retry_after_s for c in clients for a in c.attempts if a.retry_after_s is not None]

    return {"rate_rps": rate_rps, "clients": len(clients), "attempts": attempts,
            "served": len(served), "served_by_attempt": [sum(1 for c in served if len(c.attempts) == n)
                                                         for n in range(1, 2 + MAX_RETRIES)],
            "retries": len(retries), "retries_admitted": sum(1 for a in retries if a.kind == "ok"),
            "gave_up_after_429s": sum(1 for c in clients if c.attempts[-1].retry_after_s is not None),
            "other_failures": sum(1 for c in clients
                                  if c.attempts[-1].kind != "ok" and c.attempts[-1].retry_after_s is None),
            "announced_within_2x_of_work_ahead": (sum(agrees(r, d) for r, d in drains) / len(drains)
                                                   if drains else None),
            "work_ahead_drain_p50_s": pct([d for _, d in drains], 0.5),
            "announced_within_2x_of_work_ahead_as_served": (sum(agrees(r, d) for r, d in as_served) / len(as_served)
                                                             if as_served else None),
            "work_ahead_as_served_drain_p50_s": pct([d for _, d in as_served], 0.5),
            "announced_over_work_ahead_as_served_p50": pct([r / max(0.001, d) for r, d in as_served], 0.5),
            "announced_p50_s": pct(announced, 0.5), "announced_p90_s": pct(announced, 0.9),
            "admitted_ttft_p50_s": pct(admitted_ttft, 0.5), "admitted_ttft_p90_s": pct(admitted_ttft, 0.9),
            "admitted_within_target": (sum(1 for t in admitted_ttft if t <= target_s) / len(admitted_ttft)
                                       if admitted_ttft else None),
            "caller_ttft_p50_s": pct(caller_ttft, 0.5), "caller_ttft_p90_s": pct(caller_ttft, 0.9),
            "ttft_target_s": target_s, "capacity_rps": capacity_rps,
            # every client as it went (seconds on the run's clock): started; per attempt sent, answered, kind,
            # TTFT, retry-after-ms
            "clients_sent_answered_kind_ttft_retry_after": [
                [round(c.started_at, 4), [[round(a.sent_at, 4), a.answered_at and round(a.answered_at, 4), a.kind,
                                           a.ttft_s and round(a.ttft_s, 4), a.retry_after_s] for a in c.attempts]]
                for c in clients],
            "served_rps_over_run": len(served) / span_s if span_s else None}


def retry_report(summary: dict) -> list[str]:
    s = summary
    if not s["clients"]:
        return []
    rows = [f"retrying clients at {s['rate_rps']:.1f} req/s (each 429 retried after its retry-after-ms, at most "
            f"{MAX_RETRIES} times): {s['clients']} clients sent {s['attempts']} requests "
            f"({s['attempts'] / s['clients']:.2f} each); served {s['served']} "
            f"({100 * s['served'] / s['clients']:.0f}%; at attempt 1/2/3: "
            f"{'/'.join(str(n) for n in s['served_by_attempt'])}), gave up after {1 + MAX_RETRIES} 429s "
            f"{s['gave_up_after_429s']}, other failures {s['other_failures']}; a retry sent when its 429 said was "
            f"admitted {s['retries_admitted']} times of {s['retries']}"]
    if s["announced_p50_s"] is not None:
        rows.append(f"  retry-after-ms announced p50 {s['announced_p50_s']:.2f}s, p90 {s['announced_p90_s']:.2f}s; "
                    f"the work ahead of the client (every client that began before it and was served) drained "
                    f"p50 {s['work_ahead_drain_p50_s']:.2f}s after its 429; announced within 2x (or 0.1 s) of that "
                    f"for {100 * s['announced_within_2x_of_work_ahead']:.0f}% of the 429s; as much work as was ahead "
                    f"(any clients) served p50 {s['work_ahead_as_served_drain_p50_s']:.2f}s after it, announced / that "
                    f"p50 {s['announced_over_work_ahead_as_served_p50']:.2f}, within 2x (or 0.1 s) for "
                    f"{100 * s['announced_within_2x_of_work_ahead_as_served']:.0f}%")
    if s["served_rps_over_run"] is not None:
        rows.append(f"  served {s['served_rps_over_run']:.1f} req/s from the first send to the last first token, "
                    f"{s['served_rps_over_run'] / s['capacity_rps']:.2f}x the measured capacity "
                    f"({s['capacity_rps']:.1f} req/s)")
    if s["admitted_ttft_p90_s"] is not None:
        rows.append(f"  admitted attempts' TTFT p90 {s['admitted_ttft_p90_s']:.2f}s (p50 "
                    f"{s['admitted_ttft_p50_s']:.2f}s) vs target {s['ttft_target_s']}s: met by "
                    f"{100 * s['admitted_within_target']:.0f}%; served callers' TTFT from their first send, "
                    f"retries included: p50 {s['caller_ttft_p50_s']:.2f}s, p90 {s['caller_ttft_p90_s']:.2f}s")
    return rows
