"""The only writer of one request's state: the router's memory (`state`) and its Redis record, in order.

    dispatch(path, **instance)   first dispatch: create → PREFILL_QUEUED → PREFILLING (one round trip);
                                 a later one (retry, continuation): an event in the current state
    enter(to, **fields)          a transition; to == state records another attempt of the same phase
    settle(to, **fields)         the terminal transition; returns a future that completes once it is written
    flush()                      wait until every write queued so far is in Redis

Every method changes `state` at once and queues its Redis write behind the earlier ones, so the token path
never waits for Redis (TTFT does not include a round trip) while the record still walks `states.ALLOWED` in
the order the request did. A write Redis refuses surfaces at the next `flush` or `settle`. Once terminal,
the state never changes again: later calls are ignored, which is what makes ending a request idempotent
(the reaper and the request's own generator may both try).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from router.records import RecordStore, Step
from router.states import ALLOWED, TERMINAL, RequestState

log = logging.getLogger(__name__)

S = RequestState


class RequestRecordWriter:
    def __init__(self, store: RecordStore, request_id: str, fields: dict[str, str | int | float]) -> None:
        self._store = store
        self.request_id = request_id
        self._fields = fields  # written with the record's creation (model, prompt and token counts)
        self.state = S.RECEIVED
        self._stored: RequestState | None = None  # what Redis is known to hold (None: no record yet)
        self._tail: asyncio.Future[None] | None = None  # the last queued write

    def dispatch(self, path: str, **fields: str | int) -> None:
        """Record that a leg was sent to an instance: the first creates the record, later ones are events."""
        if self.state is S.RECEIVED:
            then = [Step(S.PREFILL_QUEUED, {"path": path, **fields}), Step(S.PREFILLING)]
            self._queue(S.PREFILLING, lambda: self._store.create(self.request_id, then=then, **self._fields))
        else:
            self.enter(self.state, **fields)

    def enter(self, to: RequestState, **fields: str | int) -> None:
        """Move to `to` (to == state: another attempt of this phase, where ALLOWED has the self-edge)."""
        self.enter_with_handle(to, None, **fields)

    def enter_with_handle(self, to: RequestState, handle: bytes | None, **fields: str | int) -> None:
        """`enter`, storing the prefill's context_phase_params with the record (TTL: handle_ttl_s)."""
        if self.state in TERMINAL or (to == self.state and to not in ALLOWED[to]):
            return

        async def write() -> None:
            await self._store.transition(self.request_id, to=to, handle=handle, **fields)

        self._queue(to, write)

    def settle(self, to: RequestState, **fields: str | int) -> asyncio.Future[None]:
        """The terminal transition, written after every earlier write. A request refused before any
        dispatch, or whose record could not be created, gets its record created in `to`."""
        assert to in TERMINAL, to
        earlier = self._tail

        async def write() -> None:
            if earlier is not None:
                try:
                    await earlier
                except Exception:
                    log.warning("an earlier record write of %s failed", self.request_id, exc_info=True)
            if self._stored is None:
                await self._store.create(self.request_id, then=[Step(to, dict(fields))], **self._fields)
            elif self._stored not in TERMINAL:
                await self._store.try_settle(self.request_id, to=to, **fields)
            self._stored = to

        if self.state in TERMINAL:  # ended already: that end's write is the one to wait for
            return self._tail if self._tail is not None else _done()
        self._set(to)
        self._tail = asyncio.ensure_future(write())
        return self._tail

    async def flush(self) -> None:
        """Wait for every queued write (shielded: a caller cancelled meanwhile leaves them running)."""
        if self._tail is not None:
            await asyncio.shield(self._tail)

    def _queue(self, to: RequestState, write: Callable[[], Awaitable[object]]) -> None:
        earlier = self._tail

        async def chained() -> None:
            if earlier is not None:
                await earlier
            await write()
            self._stored = to

        self._set(to)
        self._tail = asyncio.ensure_future(chained())

    def _set(self, to: RequestState) -> None:
        self.state = to


def _done() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future
