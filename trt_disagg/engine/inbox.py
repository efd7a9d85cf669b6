"""Requests the engine accepted that no step has seen yet.

Its lock is never held across a step, so a request that arrives while a forward pass runs is accepted at
once and joins the next step. Callers hand requests over one after another (Triton gives the model its next
request only when `execute()` for the previous one has returned): if accepting one waited for the running
step, a request arriving next would only be accepted after the following step had already started, and
prompts sent together would be prefilled one step each instead of in one batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from trt_disagg.engine.sequence import SeqState, Sequence


class Inbox:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seqs: dict[str, Sequence] = {}  # in arrival order

    def add(self, seq: Sequence, id_in_use: Callable[[str], bool]) -> bool:
        """Queue `seq`; False (and nothing queued) when its request id is queued here or `id_in_use` says so."""
        with self._lock:
            if seq.request_id in self._seqs or id_in_use(seq.request_id):
                return False
            self._seqs[seq.request_id] = seq
            return True

    def drain(self, accept: Callable[[Sequence], None]) -> None:
        """Hand every queued sequence to `accept`, in arrival order, under this lock: a request id is never
        in neither place while `add` checks it."""
        with self._lock:
            for seq in self._seqs.values():
                accept(seq)
            self._seqs.clear()

    def pop(self, request_id: str) -> Sequence | None:
        with self._lock:
            return self._seqs.pop(request_id, None)

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._seqs)

    def counts(self) -> tuple[int, int]:
        """(prompt tokens of the queued prompts to prefill, queued imports): for the published load."""
        with self._lock:
            prompts = sum(len(s.prompt_ids) for s in self._seqs.values() if s.state is not SeqState.IMPORTING)
            imports = sum(1 for s in self._seqs.values() if s.state is SeqState.IMPORTING)
            return prompts, imports
