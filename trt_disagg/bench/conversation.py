"""The load generator's conversation mode: multi-turn chats against an OpenAI-compatible server.

    conversations start as a Poisson process (workload.conversations.conversation_starts)
    each conversation, in order:  messages += user k  ─▶ POST /v1/chat/completions (stream) ─▶ answer text
                                  messages += the answer the server actually returned
                                  sleep think_s, then turn k+1
    one RequestRecord per turn (TTFT, tokens, the router's request id), plus the messages it sent

Turns of one conversation never overlap (a user reads the answer before typing the next message); turns of
different conversations do. A failed turn ends its conversation (the next prompt would need its answer).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from trt_disagg.bench.loadgen import DONE, sse_data
from trt_disagg.bench.metrics import RequestRecord
from trt_disagg.workload.conversations import Conversation


@dataclass
class Turn:
    """One request of a conversation run: what was sent and what came back."""

    conversation: int
    turn: int
    messages: list[dict[str, str]]
    record: RequestRecord
    answer: str = ""


@dataclass
class ConversationRun:
    turns: list[Turn] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def records(self) -> list[RequestRecord]:
        return [t.record for t in self.turns]


async def run_conversations(client: httpx.AsyncClient, url: str, model: str, conversations: Sequence[Conversation],
                            starts: Sequence[float], *, think_s: float, request_timeout_s: float = 600.0,
                            extra_body: dict[str, Any] | None = None) -> ConversationRun:
    """Every conversation, started at its time; returns the turns in send order."""
    run = ConversationRun()
    t0 = time.perf_counter()

    async def one(i: int, conv: Conversation) -> None:
        await asyncio.sleep(max(0.0, starts[i] - (time.perf_counter() - t0)))
        messages: list[dict[str, str]] = []
        for k, user in enumerate(conv.user_messages):
            messages.append({"role": "user", "content": user})
            rec = RequestRecord(index=len(run.turns), input_len=0, expected_output_len=conv.max_tokens[k],
                                scheduled_s=time.perf_counter() - t0, sent_s=time.perf_counter() - t0)
            turn = Turn(i, k, list(messages), rec)
            run.turns.append(turn)
            body = {"model": model, "messages": turn.messages, "max_tokens": conv.max_tokens[k], "temperature": 0.0,
                    "stream": True, "stream_options": {"include_usage": True}, **(extra_body or {})}
            turn.answer = await send_chat(client, url, body, rec, request_timeout_s)
            if not rec.ok:
                return
            messages.append({"role": "assistant", "content": turn.answer})
            await asyncio.sleep(think_s)

    await asyncio.gather(*(one(i, c) for i, c in enumerate(conversations)))
    run.duration_s = time.perf_counter() - t0
    return run


async def send_chat(client: httpx.AsyncClient, url: str, body: dict[str, Any], rec: RequestRecord,
                    request_timeout_s: float) -> str:
    """One streaming chat completion: fills `rec` (token times, usage, errors) and returns the answer text."""
    sent = time.perf_counter()
    parts: list[str] = []
    done = False
    try:
        async with asyncio.timeout(request_timeout_s):
            async with client.stream("POST", f"{url.rstrip('/')}/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    rec.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                    return ""
                # The router's record id (GET /v1/requests/{id}); the chunks carry the chat id instead.
                rec.request_id = resp.headers.get("x-request-id") or None
                async for data in sse_data(resp):
                    if data == DONE:
                        done = True
                        break
                    done = _take_chunk(json.loads(data), rec, parts, time.perf_counter() - sent) or done
    except TimeoutError:
        rec.error = f"timed out after {request_timeout_s:g} s"
    except httpx.HTTPError as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    except (ValueError, TypeError, AttributeError) as exc:
        rec.error = f"malformed stream data: {exc}"
    finally:
        rec.end_s = time.perf_counter() - sent
        if rec.output_tokens == 0:
            rec.output_tokens = len(rec.token_times_s)
        if rec.error is None and not done:
            rec.error = "stream ended before data: [DONE]"
    return "".join(parts)


def _take_chunk(chunk: dict[str, Any], rec: RequestRecord, parts: list[str], now_s: float) -> bool:
    """Account one SSE chunk; True never (the [DONE] line ends a stream), errors set `rec.error`."""
    if rec.request_id is None and isinstance(chunk.get("id"), str):
        rec.request_id = chunk["id"]
    if "error" in chunk:
        rec.error = f"error in stream: {str(chunk['error'])[:200]}"
        return False
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        rec.output_tokens = int(usage.get("completion_tokens") or 0)
        rec.input_len = int(usage.get("prompt_tokens") or 0)
    for choice in chunk.get("choices") or []:
        text = (choice.get("delta") or {}).get("content")
        if text:
            parts.append(text)
            rec.token_times_s.append(now_s)
    return False
