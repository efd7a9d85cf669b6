"""Multi-turn conversations as token counts: what the simulator needs to model prefix reuse.

    conversation c (ShareGPT, >= MIN_TURNS turns: user, assistant, user, assistant, ...)
    turn k          prompt  = every earlier message + user message k       (the chat resends the history)
                    output  = assistant message k
                    shared  = prompt(k-1) + output(k-1) tokens             (leading tokens equal to the
                                                                             previous turn's prompt + answer)
    timing          conversations start as a Poisson process; turn k+1 is sent `think_s` after turn k's
                    answer arrived (closed loop), or at a recorded time (a trace dumped by a live benchmark)

Prefix identity is carried in token counts only: turn k's first `shared_prefix_len` tokens are the previous
turn's prompt + answer, which is all a block cache needs to match it block by block (blocks of
tokens_per_block tokens; a block is shared when it lies wholly inside the shared prefix).

Token counts come from a tokenizer when one is given, else the ~4-characters-per-token estimate. They are
summed turn by turn (prompt(k) = prompt(k-1) + output(k-1) + user message k), so the shared prefix is exact
in the counts' own terms; a chat template's few role tokens per message are not counted.

A trace dumped by a live run (JSON, `load_conversation_trace`) carries measured send times, so a prediction
replays exactly the requests the benchmark sent:

    {"tokens_per_block": 16,                                   (optional)
     "common_prefix_len": 24,                                  (optional: leading tokens every prompt shares)
     "requests": [{"conversation": 0, "turn": 0, "arrival_s": 0.0, "input_len": 120, "output_len": 40,
                   "shared_prefix_len": 0, "think_s": 1.0}, ...]}   (or the list alone)

`input_len` may be named `prompt_tokens`, `output_len` `completion_tokens`; `shared_prefix_len` defaults to
the previous turn's input + output (capped below the prompt); `think_s` to 0; `arrival_s` is required.
Optional measurements: a request's `ttft_s`, and top-level `"policy": "least_loaded" | "kv_aware"` and
`"prefix_reuse": true | false` naming what was measured; a prediction then prints its error against them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from trt_disagg.errors import UserError
from trt_disagg.workload.types import estimate_tokens

MIN_TURNS = 3  # messages; DistServe's multi-turn filter
NO_PREVIOUS = -1
# (conversation, turn, arrival_s, input_len, output_len, shared_prefix_len or None: the default, think_s)
Row = tuple[int, int, float, int, int, int | None, float]


@dataclass(frozen=True)
class ConversationTrace:
    """Requests in send order (first turns by start time); every array has one entry per request."""

    conversation: np.ndarray  # int64: which conversation
    turn: np.ndarray  # int64: 0, 1, ... within it
    previous: np.ndarray  # int64: index of the conversation's previous turn, NO_PREVIOUS for a first turn
    input_len: np.ndarray  # int64: prompt tokens (the whole history + the new user message)
    output_len: np.ndarray  # int64: answer tokens (>= 1)
    shared_prefix_len: np.ndarray  # int64: leading prompt tokens equal to the previous prompt + answer
    think_s: np.ndarray  # float64: wait after the previous answer before this turn is sent
    arrival_s: np.ndarray  # float64: first turns' start times; later turns: recorded send times, or NaN
    replay: bool  # True: every arrival_s is a recorded send time (open loop); False: later turns closed loop
    # A dumped trace's own measurements, to set a prediction against: per request TTFT (NaN where absent), and
    # the policy label (`planner.conversations.Policy.label`) it was measured under.
    measured_ttft_s: np.ndarray | None = None
    measured_policy: str | None = None
    # Leading prompt tokens every conversation shares (a chat template's default system prompt).
    common_prefix_len: int = 0

    def __len__(self) -> int:
        return len(self.input_len)

    @property
    def num_conversations(self) -> int:
        return int(np.count_nonzero(self.previous == NO_PREVIOUS))

    def ideal_matched_tokens(self, tokens_per_block: int) -> int:
        """Prompt tokens an infinite cache with perfect routing would match: whole blocks of the shared prefix,
        within the KV the previous turn left (its prompt + answer but the last token, whose KV is never
        computed) and short of the last prompt token (a prefill computes at least one token). A first turn may
        match the prefix every prompt shares (`common_prefix_len`), the first of all included."""
        prev = self.previous
        has = prev != NO_PREVIOUS
        left = np.where(has, self.input_len[np.maximum(prev, 0)] + self.output_len[np.maximum(prev, 0)] - 1,
                        self.common_prefix_len)
        shared = np.where(has, self.shared_prefix_len, self.common_prefix_len)
        tokens = np.minimum(np.minimum(shared, left), self.input_len - 1)
        return int(np.sum(tokens // tokens_per_block * tokens_per_block))


def conversation_turns(messages: Sequence[str], count: Callable[[str], int], max_seq_len: int | None,
                       max_turns: int | None = None) -> list[tuple[int, int, int]]:
    """(input_len, output_len, shared_prefix_len) of each turn of one conversation, stopping before the first
    turn whose prompt + answer reaches the context (the chat cannot go on past it)."""
    turns: list[tuple[int, int, int]] = []
    history = 0  # tokens of every message before the current user message
    for k in range(0, len(messages) - 1, 2):
        user, answer = count(messages[k]), count(messages[k + 1])
        n_in, n_out = history + user, max(1, answer)
        if max_seq_len is not None and n_in + n_out >= max_seq_len:
            break
        turns.append((n_in, n_out, history))
        history = n_in + n_out
        if max_turns is not None and len(turns) == max_turns:
            break
    return turns


def build_conversation_trace(conversations: Sequence[Sequence[str]], *, num_conversations: int, rate: float,
                             think_s: float, seed: int = 0, tokenizer: Any = None, max_seq_len: int | None = None,
                             max_turns: int | None = None, min_turns: int = 2) -> ConversationTrace:
    """`num_conversations` conversations (seeded sample of those with >= MIN_TURNS messages and >= min_turns
    turns that fit the context) starting as a Poisson process of `rate` conversations/s."""
    if num_conversations < 1:
        raise UserError(f"conversations: need >= 1 conversation, got {num_conversations}")
    if not rate > 0:
        raise UserError(f"conversations: the rate must be > 0 conversations/s, got {rate}")
    if not think_s >= 0:
        raise UserError(f"--think-time-s must be >= 0, got {think_s}")
    rng = np.random.default_rng(seed)
    count = _counter(tokenizer)
    eligible = [c for c in conversations if len(c) >= MIN_TURNS]
    chosen: list[list[tuple[int, int, int]]] = []
    for idx in rng.permutation(len(eligible)):
        turns = conversation_turns(eligible[int(idx)], count, max_seq_len, max_turns)
        if len(turns) >= min_turns:
            chosen.append(turns)
            if len(chosen) == num_conversations:
                break
    if not chosen:
        raise UserError(f"conversations: none has >= {min_turns} turns within the context of {max_seq_len} tokens")
    starts = np.cumsum(rng.exponential(1.0 / rate, size=len(chosen)))
    rows: list[Row] = [(c, k, float(starts[c]) if k == 0 else float("nan"), n_in, n_out, shared, 0.0 if k == 0 else think_s)
            for c, turns in enumerate(chosen) for k, (n_in, n_out, shared) in enumerate(turns)]
    return _trace(rows, replay=False)


def load_conversation_trace(path: str | Path) -> ConversationTrace:
    """A trace dumped by a live conversation benchmark (see the module docstring): replayed open loop."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--trace: cannot read {p}: {exc}") from None
    items = data.get("requests") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise UserError(f"--trace {p}: expected a non-empty list of requests (or {{\"requests\": [...]}})")
    rows, measured = [], []
    for n, item in enumerate(items):
        try:
            rows.append(_row(item))
            measured.append(float(item.get("ttft_s", "nan")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"--trace {p}: request {n}: missing or bad field {exc}") from None
    trace = _trace(rows, replay=True)
    common = data.get("common_prefix_len", 0) if isinstance(data, dict) else 0
    if not isinstance(common, int) or common < 0:
        raise UserError(f"--trace {p}: common_prefix_len must be an integer >= 0, got {common!r}")
    trace = replace(trace, common_prefix_len=common)
    if all(np.isnan(measured)):
        return trace
    order = sorted(range(len(rows)), key=lambda k: (rows[k][2], rows[k][0], rows[k][1]))  # as `_trace` sorts
    return replace(trace, measured_ttft_s=np.array([measured[k] for k in order]), measured_policy=_policy_label(data))


def _policy_label(data: Any) -> str | None:
    """The dump's {"policy": "least_loaded" | "kv_aware", "prefix_reuse": bool} as a policy label."""
    if not isinstance(data, dict) or "policy" not in data:
        return None
    return f"reuse, {data['policy']}" if data.get("prefix_reuse", True) else "no reuse"


def trace_tokens_per_block(path: str | Path) -> int | None:
    """The block size a dumped trace says its engine used, if it says."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    value = data.get("tokens_per_block") if isinstance(data, dict) else None
    return int(value) if isinstance(value, int) and value > 0 else None


def _row(item: dict[str, Any]) -> Row:
    n_in = int(item["input_len"] if "input_len" in item else item["prompt_tokens"])
    n_out = int(item["output_len"] if "output_len" in item else item["completion_tokens"])
    shared = item.get("shared_prefix_len")
    arrival = float(item["arrival_s"])
    if n_in < 1 or n_out < 1 or not np.isfinite(arrival):
        raise ValueError("input_len and output_len must be >= 1 and arrival_s finite")
    return (int(item["conversation"]), int(item.get("turn", 0)), arrival, n_in, n_out,
            None if shared is None else int(shared), float(item.get("think_s", 0.0)))


def _trace(rows: list[Row], replay: bool) -> ConversationTrace:
    """Order the rows (replay: by send time; else each conversation's turns after its start) and link turns."""
    if replay:
        rows = sorted(rows, key=lambda r: (r[2], r[0], r[1]))
    else:
        rows = sorted(rows, key=lambda r: (r[0], r[1]))  # already grouped; the loop orders by time itself
    last: dict[int, int] = {}
    previous, shared = [], []
    for i, (conv, _, _, n_in, _, given, _) in enumerate(rows):
        p = last.get(conv, NO_PREVIOUS)
        previous.append(p)
        default = 0 if p == NO_PREVIOUS else rows[p][3] + rows[p][4]
        shared.append(max(0, min(default if given is None else given, n_in - 1)))
        last[conv] = i
    return ConversationTrace(
        conversation=np.array([r[0] for r in rows], dtype=np.int64), turn=np.array([r[1] for r in rows], np.int64),
        previous=np.array(previous, dtype=np.int64), input_len=np.array([r[3] for r in rows], dtype=np.int64),
        output_len=np.array([r[4] for r in rows], dtype=np.int64), shared_prefix_len=np.array(shared, np.int64),
        think_s=np.array([r[6] for r in rows], dtype=np.float64),
        arrival_s=np.array([r[2] for r in rows], dtype=np.float64), replay=replay)


def _counter(tokenizer: Any) -> Callable[[str], int]:
    if tokenizer is None:
        return estimate_tokens
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))
