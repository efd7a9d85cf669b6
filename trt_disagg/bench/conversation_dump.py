"""A live conversation run as the simulator's trace: what was sent, when, and how long its first token took.

    ConversationRun (trt_disagg.bench.conversation) + the served model's tokenizer
      ─▶ per turn, in send order: conversation, turn, arrival_s (the send time), input_len (the prompt the
         router counted), output_len (tokens returned), ttft_s, shared_prefix_len
      ─▶ {"tokens_per_block", "policy", "prefix_reuse", "requests": [...]}
         (the format `workload.conversation_trace.load_conversation_trace` reads)

`shared_prefix_len` is measured on token ids, not assumed: the leading tokens of the turn's templated prompt
that equal the previous turn's templated prompt + its answer as the tokenizer re-reads it (+ the template's
end-of-turn token, when the answer ended on it). Where the re-read answer tokenizes differently from the
tokens the engine generated, or the template rewrites earlier turns, the shared prefix ends there, as the
engine's block hashes would.

`common_prefix_len` is the template's leading tokens every conversation starts with (SmolLM2's chat template
inserts one default system prompt): whole blocks of it are cached across conversations, which a
per-conversation shared prefix does not express.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trt_disagg.bench.conversation import ConversationRun, Turn


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt ids the router builds for `messages` (the chat template with the generation prompt)."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return [int(t) for t in (out["input_ids"] if hasattr(out, "keys") else out)]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Leading positions where `a` and `b` hold the same token."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def trace_document(run: ConversationRun, tokenizer: Any, *, tokens_per_block: int, policy: str,
                   prefix_reuse: bool) -> dict[str, Any]:
    """The run's completed turns as a replayable trace, labelled with what served them."""
    rows: list[dict[str, Any]] = []
    previous: dict[int, tuple[list[int], Turn]] = {}  # conversation -> (its last turn's ids, that turn)
    firsts: list[list[int]] = []
    end_of_turn = _end_of_turn_ids(tokenizer)
    for t in sorted(run.turns, key=lambda t: t.record.sent_s):
        if not t.record.ok:
            continue
        ids = chat_ids(tokenizer, t.messages)
        shared = 0
        if t.conversation in previous:
            prev_ids, prev = previous[t.conversation]
            answer = tokenizer(prev.answer, add_special_tokens=False)["input_ids"]
            left = len(prev_ids) + max(1, prev.record.output_tokens)  # the KV the previous turn can have left
            shared = min(common_prefix_len(ids, prev_ids + list(answer) + end_of_turn), left)
        else:
            firsts.append(ids)
        previous[t.conversation] = (ids, t)
        rec = t.record
        rows.append({"conversation": t.conversation, "turn": t.turn, "arrival_s": round(rec.sent_s, 6),
                     "input_len": rec.input_len or len(ids), "output_len": max(1, rec.output_tokens),
                     "ttft_s": round(rec.token_times_s[0], 6), "shared_prefix_len": shared})
    return {"tokens_per_block": tokens_per_block, "policy": policy, "prefix_reuse": prefix_reuse,
            "common_prefix_len": _common_prefix(firsts), "requests": rows}


def _end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The token a chat template closes an assistant turn with (the EOS of an instruct model), if any."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return [int(eos)] if isinstance(eos, int) else []


def _common_prefix(prompts: list[list[int]]) -> int:
    if len(prompts) < 2:
        return 0
    n = min(len(p) for p in prompts)
    for p in prompts[1:]:
        n = min(n, common_prefix_len(prompts[0], p))
    return n
