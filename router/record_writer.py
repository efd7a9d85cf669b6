"""The only writer of one request's state: the router's memory (`state`) and its Redis record, in order.

    dispatch(path, **instance)   first dispatch: create → PREFILL_QUEUED → PREFILLING (one round trip);
                                 a later one (retry, continuation): an event in the current state
    enter(to, **fields)          a transition; to == state records another attempt of the same phase
    settle(ending, **fields)     the terminal transition; returns a future that completes once it is written
    flush()                      wait until every write queued so far is in Redis

Every method changes `state` at once and queues its Redis write behind the earlier ones, so the token path
never waits for Redis (TTFT does not include a round trip) while the record still walks `states.ALLOWED` in
the order the request did. Transitions queued while an earlier write is in flight go to Redis together, in
one round trip, when their turn comes: a request's hand-off, decode dispatch, first decoded token and end
come within milliseconds of each other, and under overload the router spent a fifth of its time on record
writes, one round trip per transition. A write Redis refuses surfaces at the next `flush` or `settle`.

Redis outages: a write that cannot reach Redis is retried (backing off) for up to `retry_s`, so a request
that was admitted before an outage streams on and its record catches up, in order, when Redis is back. A
write still failing after `retry_s` is given up with a warning: the record then misses the request's later
states (new requests are refused while Redis is unreachable, RequestTable.admit). A Redis that comes back
empty (restarted without persistence) has lost the record: the writer creates it again from the walk it
has kept (every transition so far, timestamped when written again), so the record still ends where the
request did. Once terminal,
the state never changes again: later calls are ignored, which is what makes ending a request idempotent
(the reaper and the request's own generator may both try).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router.ending import Ending
from router.records import RecordStore, Step, TransitionRefused
from router.states import ALLOWED, TERMINAL, RequestState

log = logging.getLogger(__name__)

S = RequestState


class RequestRecordWriter:
    def __init__(self, store: RecordStore, request_id: str, fields: dict[str, str | int | float], *,
                 retry_s: float = 0.0) -> None:
        self._store = store
        self._retry_s = retry_s
        self.request_id = request_id
        self._fields = fields  # written with the record's creation (model, prompt and token counts)
        self.state = S.RECEIVED
        self.ending: Ending | None = None  # set with the terminal state
        self._stored: RequestState | None = None  # what Redis is known to hold (None: no record yet)
        self._walk: list[Step] = []  # every transition queued so far, from RECEIVED
        self._unwritten: list[Step] = []  # transitions queued that no write has taken yet
        self._tail: asyncio.Future[None] | None = None  # the last queued write

    def dispatch(self, path: str, **fields: str | int) -> None:
        """Record that a leg was sent to an instance: the first creates the record, later ones are events."""
        if self.state is not S.RECEIVED:
            self.enter(self.state, **fields)
            return
        self._walk += [Step(S.PREFILL_QUEUED, {"path": path, **fields}), Step(S.PREFILLING)]
        walk = list(self._walk)

        async def create() -> None:
            await self._retried(lambda: self._store.create(self.request_id, then=walk, **self._fields))
            self._stored = S.PREFILLING

        self._set(S.PREFILLING)
        self._queue(create)

    def enter(self, to: RequestState, **fields: str | int) -> None:
        self.enter_with_handle(to, None, **fields)

    def enter_with_handle(self, to: RequestState, handle: bytes | None, **fields: str | int | float) -> None:
        """`enter`, storing the prefill's context_phase_params with the record (TTL: handle_ttl_s)."""
        if self.state in TERMINAL or (to == self.state and to not in ALLOWED[to]):
            return
        self._set(to)
        if self._add_unwritten(Step(to, dict(fields), handle)):
            self._queue(self._write_unwritten)

    def settle(self, ending: Ending, **extra: str | int) -> asyncio.Future[None]:
        """The terminal transition, written after every earlier write. A request refused before any
        dispatch, or whose record could not be created, gets its record created with its whole walk."""
        if self.state in TERMINAL:  # ended already: that end's write is the one to wait for
            return self._tail if self._tail is not None else _done()
        to = ending.state
        step = Step(to, {**ending.fields(), **extra})
        self._add_unwritten(step)
        walk, earlier = list(self._walk), self._tail

        async def write() -> None:
            failed = False
            if earlier is not None:
                try:
                    await earlier
                except Exception:
                    failed = True
                    log.warning("an earlier record write of %s failed", self.request_id, exc_info=True)
            # this end with the transitions queued since the last write began; none when that write took it
            # along. After a failed write the end goes alone: the steps between what Redis holds and the ones
            # left behind are lost, and the end is allowed from any state that is not terminal.
            steps, self._unwritten = self._unwritten, []
            if failed or not steps:
                steps = [step]
            if self._stored is None:
                await self._retried(lambda: self._store.create(self.request_id, then=walk, **self._fields))
            elif self._stored not in TERMINAL:
                await self._retried(lambda: self._transitions_or_recreate(steps, walk))
            self._stored = to

        self.ending = ending
        self._set(to)
        self._tail = asyncio.ensure_future(write())
        return self._tail

    async def flush(self) -> None:
        """Wait for every queued write (shielded: a caller cancelled meanwhile leaves them running)."""
        if self._tail is not None:
            await asyncio.shield(self._tail)

    def _add_unwritten(self, step: Step) -> bool:
        """Queue `step` for writing; True when it needs a write of its own (no queued write will take it)."""
        self._walk.append(step)
        self._unwritten.append(step)
        return len(self._unwritten) == 1

    async def _write_unwritten(self) -> None:
        """Every transition queued and not yet written, in one round trip: taken when this write's turn comes,
        so the ones queued while earlier writes were in flight go along (it is queued only with one waiting,
        and runs only if every write before it succeeded, so there is at least that one)."""
        steps, self._unwritten = self._unwritten, []
        walk = list(self._walk)  # the unwritten steps are its tail
        await self._retried(lambda: self._transitions_or_recreate(steps, walk))
        self._stored = steps[-1].to

    async def _transitions_or_recreate(self, steps: list[Step], walk: list[Step]) -> None:
        try:
            await self._store.transitions(self.request_id, steps)
        except TransitionRefused as exc:
            if exc.current is not None:
                if steps[-1].to in TERMINAL and exc.current in TERMINAL:  # settled by another party (an orphan
                    return  # sweep) before these steps that end it
                raise
            log.warning("the record of %s is gone (Redis restarted?); writing it again", self.request_id)
            await self._store.create(self.request_id, then=walk, **self._fields)

    def _queue(self, write: Callable[[], Awaitable[None]]) -> None:
        """Run `write` once every write queued before it has finished (not at all if one of them failed)."""
        earlier = self._tail

        async def chained() -> None:
            if earlier is not None:
                await earlier
            await write()

        self._tail = asyncio.ensure_future(chained())

    async def _retried(self, write: Callable[[], Awaitable[object]]) -> None:
        """`write`, again after a connection failure (backing off to 1 s) until `retry_s` has passed."""
        give_up_s = time.monotonic() + self._retry_s
        pause_s = 0.05
        while True:
            try:
                await write()
                return
            except (RedisConnectionError, RedisTimeoutError, OSError):
                if time.monotonic() + pause_s > give_up_s:
                    raise
                await asyncio.sleep(pause_s)  # backing off until Redis answers again
                pause_s = min(1.0, 2 * pause_s)

    def _set(self, to: RequestState) -> None:
        self.state = to


def _done() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future
