"""The conversation mode: ShareGPT conversations that fit, Poisson starts, and turns that resend the history
with the answer the server actually returned."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from trt_disagg.bench.conversation import run_conversations
from trt_disagg.workload.conversations import Conversation, conversation_starts, pick_conversations

SHAREGPT_LIKE = [
    ("hi", "hello there"),  # one turn: too short
    ("q1", "a1", "q2", "a2", "q3", "a3"),
    ("x" * 4000, "y", "z", "w", "v", "u"),  # too long
    ("r1", "s1", "r2", "s2", "r3"),  # 3 user turns, the last without a recorded answer
]


def test_only_conversations_with_enough_turns_that_fit_are_picked() -> None:
    convs = pick_conversations(SHAREGPT_LIKE, num=2, min_turns=3, max_prompt_tokens=200, max_answer_tokens=5)
    assert sorted(c.user_messages for c in convs) == [("q1", "q2", "q3"), ("r1", "r2", "r3")]
    assert all(c.num_turns == 3 and all(1 <= m <= 5 for m in c.max_tokens) for c in convs)
    with pytest.raises(ValueError, match="only 2 conversations"):
        pick_conversations(SHAREGPT_LIKE, num=3, min_turns=3, max_prompt_tokens=200, max_answer_tokens=5)


def test_conversation_starts_are_poisson() -> None:
    starts = conversation_starts(4000, rate=2.0, seed=1)
    assert starts[0] == 0 and np.all(np.diff(starts) >= 0)
    assert np.mean(np.diff(starts)) == pytest.approx(0.5, rel=0.1)


def sse(answer: str) -> bytes:
    chunks = [{"id": "chatcmpl-1", "choices": [{"delta": {"content": answer[i:i + 4]}, "finish_reason": None}]}
              for i in range(0, len(answer), 4)]
    chunks.append({"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks).encode() + b"data: [DONE]\n\n"


async def test_each_turn_resends_the_history_with_the_returned_answer() -> None:
    bodies: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        return httpx.Response(200, content=sse(f"answer {len(body['messages'])} ok"))

    convs = [Conversation(("q1", "q2", "q3"), (3, 3, 3))]
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        run = await run_conversations(client, "http://x", "m", convs, [0.0], think_s=0.0)
    assert [len(b["messages"]) for b in bodies] == [1, 3, 5]
    assert bodies[2]["messages"] == [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "answer 1 ok"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "answer 3 ok"},
        {"role": "user", "content": "q3"}]
    assert all(r.ok and r.output_tokens == 3 and r.request_id == "chatcmpl-1" for r in run.records)
