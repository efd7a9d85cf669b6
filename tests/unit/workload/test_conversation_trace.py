"""Conversation traces: turns in order sharing the previous prompt + answer, Poisson starts, closed loop;
a live benchmark's dump replayed at its send times; bad dumps refused with the field named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trt_disagg.errors import UserError
from trt_disagg.workload.conversation_trace import (
    build_conversation_trace,
    conversation_turns,
    load_conversation_trace,
)


def words(text: str) -> int:
    return len(text.split())


def test_each_turn_resends_the_history_and_stops_before_the_context():
    messages = ["a b c", "d e", "f", "g h i j", "k l", "m"]
    assert conversation_turns(messages, words, None) == [(3, 2, 0), (6, 4, 5), (12, 1, 10)]
    assert conversation_turns(messages, words, max_seq_len=11) == [(3, 2, 0), (6, 4, 5)]
    assert conversation_turns(messages, words, None, max_turns=1) == [(3, 2, 0)]


def test_a_sampled_trace_links_turns_and_starts_conversations_as_a_poisson_process():
    convs = [("u1 x", "a1 y z", "u2", "a2"), ("only one",), ("p", "q", "r", "s", "t", "v")] * 20
    trace = build_conversation_trace(convs, num_conversations=30, rate=2.0, think_s=1.5, seed=1, tokenizer=None)
    assert trace.num_conversations == 30 and not trace.replay
    first = trace.previous == -1
    starts = trace.arrival_s[first]
    assert np.all(np.diff(starts) > 0) and np.isnan(trace.arrival_s[~first]).all()
    for i in np.flatnonzero(~first):
        p = trace.previous[i]
        assert trace.conversation[p] == trace.conversation[i] and trace.turn[p] == trace.turn[i] - 1
        assert trace.shared_prefix_len[i] == trace.input_len[p] + trace.output_len[p]
        assert trace.think_s[i] == 1.5


def test_a_dumped_trace_is_replayed_in_send_order_with_default_shared_prefixes(tmp_path: Path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"tokens_per_block": 8, "requests": [
        {"conversation": 7, "turn": 1, "arrival_s": 5.0, "prompt_tokens": 90, "completion_tokens": 3},
        {"conversation": 7, "turn": 0, "arrival_s": 0.0, "input_len": 50, "output_len": 30},
        {"conversation": 8, "turn": 0, "arrival_s": 1.0, "input_len": 10, "output_len": 2, "shared_prefix_len": 0},
    ]}))
    trace = load_conversation_trace(path)
    assert trace.replay and trace.arrival_s.tolist() == [0.0, 1.0, 5.0]
    assert trace.previous.tolist() == [-1, -1, 0] and trace.shared_prefix_len.tolist() == [0, 0, 80]
    assert trace.ideal_matched_tokens(8) == 72  # min(80, 50 + 30 - 1) // 8 * 8


def test_a_dumped_trace_names_the_prefix_every_prompt_shares(tmp_path: Path):
    path = tmp_path / "trace.json"
    requests = [{"conversation": 0, "turn": 0, "arrival_s": 0.0, "input_len": 50, "output_len": 30},
                {"conversation": 1, "turn": 0, "arrival_s": 1.0, "input_len": 10, "output_len": 2}]
    path.write_text(json.dumps({"common_prefix_len": 8, "requests": requests}))
    trace = load_conversation_trace(path)
    assert trace.common_prefix_len == 8
    assert trace.ideal_matched_tokens(8) == 16  # one whole block of the common prefix per first turn
    path.write_text(json.dumps({"common_prefix_len": -1, "requests": requests}))
    with pytest.raises(UserError, match="common_prefix_len"):
        load_conversation_trace(path)


@pytest.mark.parametrize("content, message", [
    ("not json", "cannot read"),
    ("[]", "non-empty list"),
    ('[{"conversation": 0, "arrival_s": 0, "input_len": 5}]', "request 0: missing or bad field"),
    ('[{"conversation": 0, "arrival_s": 0, "input_len": 0, "output_len": 1}]', "request 0"),
])
def test_a_bad_trace_is_refused_naming_what_is_wrong(tmp_path: Path, content, message):
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_conversation_trace(path)


def test_bad_trace_parameters_are_refused():
    with pytest.raises(UserError, match="think"):
        build_conversation_trace([("a", "b", "c", "d")], num_conversations=1, rate=1.0, think_s=-1.0)
    with pytest.raises(UserError, match="none has"):
        build_conversation_trace([("a", "b")], num_conversations=1, rate=1.0, think_s=1.0)
