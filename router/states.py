"""The request automaton: one enum, one table of edges, one set of terminal states.

    disaggregated:  RECEIVED → PREFILL_QUEUED → PREFILLING → PREFILL_DONE → DECODE_DISPATCHED → DECODING → DONE
    colocated:      RECEIVED → PREFILL_QUEUED → PREFILLING ─────────────────────────────────→ DECODING → DONE
                    (one context_and_generation call: PREFILLING until its first token, then DECODING)
    any non-terminal state → FAILED | CANCELLED

Self-edges are not "going back", they record a second attempt of the same phase as a new event:
PREFILLING → PREFILLING (prefill retried on another instance), DECODE_DISPATCHED → DECODE_DISPATCHED and
DECODING → DECODING (a lost decode leg continued on another instance after re-prefilling prompt + tokens so
far). PREFILL_DONE → DONE covers a request whose first token already ends it
(max_tokens 1 or the end token); DECODE_DISPATCHED → DONE a decode leg that ends at once (its first
token is the end token). Enum order means nothing; only `ALLOWED` says what may follow what.
"""

from __future__ import annotations

import enum


class RequestState(enum.StrEnum):
    RECEIVED = "RECEIVED"
    PREFILL_QUEUED = "PREFILL_QUEUED"
    PREFILLING = "PREFILLING"
    PREFILL_DONE = "PREFILL_DONE"
    DECODE_DISPATCHED = "DECODE_DISPATCHED"
    DECODING = "DECODING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


S = RequestState
TERMINAL: frozenset[RequestState] = frozenset({S.DONE, S.FAILED, S.CANCELLED})
_ENDS = frozenset({S.FAILED, S.CANCELLED})

ALLOWED: dict[RequestState, frozenset[RequestState]] = {
    S.RECEIVED: frozenset({S.PREFILL_QUEUED}) | _ENDS,
    S.PREFILL_QUEUED: frozenset({S.PREFILLING}) | _ENDS,
    S.PREFILLING: frozenset({S.PREFILLING, S.PREFILL_DONE, S.DECODING}) | _ENDS,
    S.PREFILL_DONE: frozenset({S.DECODE_DISPATCHED, S.DONE}) | _ENDS,
    S.DECODE_DISPATCHED: frozenset({S.DECODE_DISPATCHED, S.DECODING, S.DONE}) | _ENDS,
    S.DECODING: frozenset({S.DECODING, S.DONE}) | _ENDS,
    S.DONE: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


def sources_of(to: RequestState) -> frozenset[RequestState]:
    """The states from which `to` may be entered (what the Lua script checks)."""
    return frozenset(src for src, targets in ALLOWED.items() if to in targets)
