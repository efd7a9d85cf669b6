"""A live conversation run as the simulator's trace: send order, the server's counts, measured TTFT, and the
shared prefix measured on token ids (including the template's end-of-turn token, never past the KV the
previous turn left); the written trace is what `load_conversation_trace` reads back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trt_disagg.bench.conversation import ConversationRun, Turn
from trt_disagg.bench.conversation_dump import common_prefix_len, trace_document
from trt_disagg.bench.metrics import RequestRecord
from trt_disagg.workload.conversation_trace import load_conversation_trace

BOS, START, END = 1, 2, 3
ROLES = {"user": 5, "assistant": 4}


class WordTokenizer:
    """A word is one id (from its letters); a ChatML-like template: BOS, then START role words END per message,
    then START assistant (the generation prompt, as the history later renders the answer's turn)."""

    eos_token_id = END

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [100 + sum(map(ord, w)) for w in text.split()]}

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool,
                            tokenize: bool) -> list[int]:
        ids = [BOS]
        for m in messages:
            ids += [START, ROLES[m["role"]], *self(m["content"])["input_ids"], END]
        return ids + [START, ROLES["assistant"]]


def turn(conversation: int, k: int, messages: list[dict[str, str]], answer: str, sent_s: float, ttft_s: float,
         output_tokens: int, ok: bool = True) -> Turn:
    rec = RequestRecord(index=0, input_len=0, expected_output_len=8, scheduled_s=sent_s, sent_s=sent_s)
    rec.token_times_s = [ttft_s, ttft_s + 0.1]
    rec.output_tokens = output_tokens
    rec.error = None if ok else "HTTP 500"
    return Turn(conversation, k, messages, rec, answer)


def test_the_trace_measures_shared_prefixes_on_token_ids(tmp_path: Path) -> None:
    u1, a1, u2 = "one two three", "four five", "six"
    first = [{"role": "user", "content": u1}]
    second = [*first, {"role": "assistant", "content": a1}, {"role": "user", "content": u2}]
    other = [{"role": "user", "content": "seven"}]
    run = ConversationRun([turn(0, 1, second, "x", 5.0, 0.2, 1), turn(0, 0, first, a1, 0.0, 0.5, 3),
                           turn(1, 0, other, "y", 1.0, 0.3, 1), turn(2, 0, other, "", 2.0, 0.0, 0, ok=False)])
    doc: dict[str, Any] = trace_document(run, WordTokenizer(), tokens_per_block=4, policy="kv_aware",
                                         prefix_reuse=True)
    rows = doc["requests"]
    assert [(r["conversation"], r["turn"]) for r in rows] == [(0, 0), (1, 0), (0, 1)]  # send order, failed left out
    prompt1 = len(WordTokenizer().apply_chat_template(first, True, True))  # BOS, user's 3 words, START assistant
    assert rows[0]["input_len"] == prompt1 == 9 and rows[0]["output_len"] == 3 and rows[0]["ttft_s"] == 0.5
    # turn 2 repeats prompt 1's ids, then the answer's two words and END: all of it is what turn 1 left
    assert rows[2]["shared_prefix_len"] == prompt1 + 2 + 1
    assert doc["common_prefix_len"] == 3  # BOS START user: where every first prompt starts
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(doc))
    trace = load_conversation_trace(path)
    assert trace.measured_policy == "reuse, kv_aware" and trace.common_prefix_len == 3
    assert trace.shared_prefix_len.tolist() == [0, 0, 12]


def test_the_shared_prefix_stops_at_the_kv_the_previous_turn_left() -> None:
    first = [{"role": "user", "content": "a b"}]
    second = [*first, {"role": "assistant", "content": "c d e"}, {"role": "user", "content": "f"}]
    # the server generated 2 tokens (the answer re-reads as 3 words): at most prompt + 2 tokens are held
    run = ConversationRun([turn(0, 0, first, "c d e", 0.0, 0.1, 2), turn(0, 1, second, "g", 3.0, 0.1, 1)])
    rows = trace_document(run, WordTokenizer(), tokens_per_block=4, policy="least_loaded",
                          prefix_reuse=False)["requests"]
    assert rows[1]["shared_prefix_len"] == rows[0]["input_len"] + 2


def test_common_prefix_len() -> None:
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_len([], [1]) == 0
