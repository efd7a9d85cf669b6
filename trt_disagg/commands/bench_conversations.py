"""`trt-disagg bench --conversations N`: multi-turn chats against a running deployment, the prefix-reuse load.

    trt-disagg bench --url http://127.0.0.1:8000 --config configs/smollm2.yaml --conversations 20 --rates 0.1

    N ShareGPT conversations (workload.conversations: >= 3 user turns, or --max-turns if fewer; the whole
    history fits the deployment's prompt limit) start as a Poisson process at each --rates value
    (conversations/s). Each turn is a streaming chat completion whose messages are the previous turn's
    messages + the answer the server actually returned + the next user message (bench.conversation);
    the next turn is sent --think-time-s after the answer ended.
      ─▶ per rate: TTFT / TPOT / ITL and SLO attainment over every turn (the usual bench table and files)
      ─▶ prefix hit rate: prompt tokens the serving instance already held / prompt tokens, first turns and
         later turns apart, from the router's per-request records (GET /v1/requests/{id}: matched_tokens);
         "-" where the server keeps no such record
      ─▶ with a tokenizer (--config or --tokenizer): conversation_trace_<rate>.json, the turns as sent with
         their measured TTFT, which `trt-disagg simulate --trace` replays

Rates are conversations per second here, not requests per second; goodput is per turn at that rate.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from trt_disagg.bench.conversation import ConversationRun
from trt_disagg.bench.metrics import RunResult
from trt_disagg.config import SLO
from trt_disagg.errors import UserError

CheckTarget = Callable[[], Awaitable[None]]  # the usual bench's server check (model, limits)
TRACE_TOKENS_PER_BLOCK = 16  # the block size written into a trace (the simulator's default; --tokens-per-block overrides)


@dataclass(frozen=True)
class ConversationOptions:
    """The conversation mode's own flags (the rest are the usual bench flags)."""

    num_conversations: int
    think_time_s: float
    max_turns: int
    max_answer_tokens: int

    def check(self) -> None:
        """Each flag on its own, before anything is loaded or sent; the message names the flag."""
        if self.num_conversations < 1:
            raise UserError(f"--conversations must be >= 1, got {self.num_conversations}")
        if not self.think_time_s >= 0:
            raise UserError(f"--think-time-s must be >= 0, got {self.think_time_s}")
        if self.max_turns < 1:
            raise UserError(f"--max-turns must be >= 1, got {self.max_turns}")
        if self.max_answer_tokens < 1:
            raise UserError(f"--max-answer-tokens must be >= 1, got {self.max_answer_tokens}")

    @property
    def min_turns(self) -> int:
        """Multi-turn conversations (DistServe's >= 3), unless the cap asks for fewer."""
        return min(3, self.max_turns)


@dataclass(frozen=True)
class HitRate:
    """Prompt tokens the serving instance held (router records), over the turns that have a record."""

    first_turns: tuple[int, int]  # (matched, prompt) tokens
    later_turns: tuple[int, int]
    num_records: int

    @property
    def overall(self) -> float | None:
        prompt = self.first_turns[1] + self.later_turns[1]
        return (self.first_turns[0] + self.later_turns[0]) / prompt if prompt else None


def pick(opts: ConversationOptions, tok: Any, max_input_len: int | None, seed: int) -> list[Any]:
    """The conversations, sized by the served tokenizer when there is one (else ~4 characters per token)."""
    from trt_disagg.workload.conversations import pick_conversations
    from trt_disagg.workload.datasets import sharegpt_conversations
    from trt_disagg.workload.types import estimate_tokens

    count = (lambda text: len(tok(text, add_special_tokens=False)["input_ids"])) if tok is not None else estimate_tokens
    try:
        return pick_conversations(sharegpt_conversations(), num=opts.num_conversations, min_turns=opts.min_turns,
                                  max_turns=opts.max_turns, max_prompt_tokens=max_input_len or 2048,
                                  max_answer_tokens=opts.max_answer_tokens, seed=seed, count=count)
    except ValueError as exc:
        raise UserError(f"--conversations: {exc}") from None


async def run_conversation_rates(settings: dict[str, Any], slo: SLO, opts: ConversationOptions, convs: list[Any],
                                 out: Path, tok: Any) -> tuple[list[RunResult], list[HitRate | None]]:
    """One run of every conversation per rate: the runs (one RunResult each) and their hit rates."""
    from trt_disagg.bench.conversation import run_conversations
    from trt_disagg.bench.loadgen import make_client
    from trt_disagg.workload.conversations import conversation_starts

    runs, hits = [], []
    async with make_client(request_timeout_s=settings["timeout_s"]) as client:
        for rate in settings["rates"]:
            starts = conversation_starts(len(convs), rate, settings["seed"])
            run = await run_conversations(client, settings["url"], settings["model"], convs, starts.tolist(),
                                          think_s=opts.think_time_s, request_timeout_s=settings["timeout_s"],
                                          extra_body={"temperature": settings["temperature"]})
            runs.append(RunResult(rate, "poisson", slo, run.records, run.duration_s))
            hits.append(await hit_rate(client, settings["url"], run))
            if tok is not None:
                write_trace(run, tok, out / f"conversation_trace_{rate:g}.json")
    return runs, hits


async def hit_rate(client: httpx.AsyncClient, url: str, run: ConversationRun) -> HitRate | None:
    """Matched prompt tokens per turn from the router's request records; None when it keeps none."""
    first, later, found = [0, 0], [0, 0], 0
    for turn in run.turns:
        rec = turn.record
        if not rec.ok or rec.request_id is None:
            continue
        fields = await _record_fields(client, url, rec.request_id)
        if fields is None or "matched_tokens" not in fields:
            continue
        found += 1
        into = first if turn.turn == 0 else later
        into[0] += int(fields["matched_tokens"])
        into[1] += rec.input_len
    return HitRate((first[0], first[1]), (later[0], later[1]), found) if found else None


async def _record_fields(client: httpx.AsyncClient, url: str, request_id: str) -> dict[str, Any] | None:
    try:
        resp = await client.get(f"{url.rstrip('/')}/v1/requests/{request_id}")
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    try:
        fields = resp.json().get("fields")
    except (ValueError, AttributeError):
        return None
    return fields if isinstance(fields, dict) else None


def write_trace(run: ConversationRun, tok: Any, path: Path) -> None:
    """The turns as sent, for `trt-disagg simulate --trace` (the policy is the server's, not known here)."""
    from trt_disagg.bench.conversation_dump import trace_document

    path.parent.mkdir(parents=True, exist_ok=True)
    doc = trace_document(run, tok, tokens_per_block=TRACE_TOKENS_PER_BLOCK, policy="unknown", prefix_reuse=True)
    del doc["policy"]  # a trace without a policy label is predicted without a measured comparison
    path.write_text(json.dumps(doc, indent=1))


def hit_table(rates: list[float], hits: list[HitRate | None]) -> Table:
    table = Table(title="Prefix hits (prompt tokens the serving instance held, router records)")
    for col in ("conv/s", "turns with a record", "first turns", "later turns", "all"):
        table.add_column(col, justify="right")
    for rate, h in zip(rates, hits, strict=True):
        if h is None:
            table.add_row(f"{rate:g}", "0", "-", "-", "-")
            continue
        table.add_row(f"{rate:g}", str(h.num_records), _share(h.first_turns), _share(h.later_turns),
                      f"{h.overall:.1%}" if h.overall is not None else "-")
    return table


def _share(pair: tuple[int, int]) -> str:
    return f"{pair[0] / pair[1]:.1%}" if pair[1] else "-"


async def bench_conversations(settings: dict[str, Any], slo: SLO, opts: ConversationOptions, tok: Any,
                              out: Path, console: Console, check_target: CheckTarget) -> list[RunResult]:
    """Check the server, pick the conversations, run every rate; print the hit table and the usual files."""
    await check_target()
    convs = pick(opts, tok, settings["max_input_len"], settings["seed"])
    settings["conversations"] = {"num": len(convs), "turns": sum(c.num_turns for c in convs),
                                 "think_time_s": opts.think_time_s, "max_turns": opts.max_turns,
                                 "max_answer_tokens": opts.max_answer_tokens, "rates_are": "conversations/s"}
    runs, hits = await run_conversation_rates(settings, slo, opts, convs, out, tok)
    settings["conversations"]["hit_rates"] = [None if h is None else h.overall for h in hits]
    console.print(hit_table(settings["rates"], hits))
    return runs


def run(settings: dict[str, Any], slo: SLO, opts: ConversationOptions, tok: Any, out: Path, console: Console,
        check_target: CheckTarget) -> list[RunResult]:
    return asyncio.run(bench_conversations(settings, slo, opts, tok, out, console, check_target))
