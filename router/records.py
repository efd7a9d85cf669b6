"""Durable request records in Redis; `transition` is the only writer of a request's state.

The keys (`trtd:req:<id>`, its `:events` and `:handle`, `trtd:router:<rid>:active`) and what they hold
are written down in `trt_disagg.keys`.

`transition` runs one Lua script: it reads the state, checks the edge against `states.ALLOWED` (the
allowed source states are passed in, so the table lives only in Python), writes the state and the fields,
stamps t_<STATE> the first time, appends the event, stores the handle, and on a terminal state removes
the id from the active set, sets the retention TTL and appends a summary to the bounded `trtd:finished`
stream (what the autoscaler reads as the observed workload). Atomic, so two routers (or a router and its own
reaper) cannot interleave a read and a write and move a request backwards.

A live record expires after request_timeout + retention even if its router dies and never returns; a
router that does return calls `settle_orphans` at start-up and fails what it left unfinished.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.states import TERMINAL, RequestState, sources_of
from trt_disagg.keys import (
    FINISHED_MAXLEN,
    active_key,
    as_text,
    events_key,
    finished_key,
    handle_key,
    record_key,
)

log = logging.getLogger(__name__)

_TRANSITION_LUA = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {'missing', ''} end
local allowed = false
for src in string.gmatch(ARGV[2], '[^,]+') do
  if src == cur then allowed = true end
end
if not allowed then return {'refused', cur} end
local to, ts = ARGV[1], ARGV[3]
redis.call('HSET', KEYS[1], 'state', to)
redis.call('HSETNX', KEYS[1], 't_' .. to, ts)
local nfields = tonumber(ARGV[7])
for i = 0, nfields - 1 do
  redis.call('HSET', KEYS[1], ARGV[9 + 2 * i], ARGV[10 + 2 * i])
end
redis.call('RPUSH', KEYS[2], ARGV[4])
if ARGV[8] ~= '' then
  redis.call('SET', KEYS[4], ARGV[8], 'PX', tonumber(ARGV[6]))
end
if ARGV[5] ~= '0' then
  redis.call('ZREM', KEYS[3], ARGV[9 + 2 * nfields])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]))
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[5]))
  redis.call('DEL', KEYS[4])
  local first = redis.call('HGET', KEYS[1], 't_PREFILL_DONE') or redis.call('HGET', KEYS[1], 't_DECODING') or ''
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[9 + 2 * nfields + 1], '*', 's', to,
             't0', redis.call('HGET', KEYS[1], 't_RECEIVED') or ts, 't1', first, 't2', ts,
             'p', redis.call('HGET', KEYS[1], 'prompt_tokens') or '0',
             'o', redis.call('HGET', KEYS[1], 'output_tokens') or '0')
end
return {'ok', cur}
"""


class TransitionRefused(Exception):
    """The edge does not exist (or the record is gone): a bug in the caller or a lost race."""

    def __init__(self, request_id: str, current: str | None, to: RequestState) -> None:
        super().__init__(f"request {request_id}: {current or 'missing'} -> {to} is not allowed")
        self.current = RequestState(current) if current else None  # None: the record does not exist
        self.to = to


@dataclass(frozen=True)
class Step:
    """One transition of a batch (`RecordStore.create(..., then=[...])`, `RecordStore.transitions`)."""

    to: RequestState
    fields: dict[str, str | int | float] = field(default_factory=dict)
    handle: bytes | None = None  # stored with the record by `transitions` (a new record is created without)


@dataclass
class RequestRecord:
    """A request as stored: its fields (strings, as Redis keeps them) and its event log."""

    request_id: str
    state: RequestState
    fields: dict[str, str]
    events: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        ts = {k[2:]: float(v) for k, v in self.fields.items() if k.startswith("t_")}
        plain = {k: v for k, v in self.fields.items() if not k.startswith("t_") and k != "state"}
        return {"id": self.request_id, "state": self.state.value, "timestamps": ts, "fields": plain,
                "events": self.events}


class RecordStore:
    """Creates, moves and reads request records for one router."""

    def __init__(self, redis: Any, router_id: str, retention_s: float, live_ttl_s: float,
                 handle_ttl_s: float) -> None:
        self._redis = redis
        self.router_id = router_id
        self._retention_ms = int(retention_s * 1000)
        self._live_ttl_ms = int((live_ttl_s + retention_s) * 1000)
        self._handle_ttl_ms = int(handle_ttl_s * 1000)
        self._script = redis.register_script(_TRANSITION_LUA)

    async def create(self, request_id: str, then: Sequence[Step] = (), **fields: str | int | float) -> None:
        """A new record in RECEIVED, owned by this router, then the transitions `then` — one round trip.

        Raises TransitionRefused when one of `then` is not allowed (the ones before it are applied).
        """
        now = time.time()
        mapping = {"state": RequestState.RECEIVED.value, "router": self.router_id, "created_at": repr(now),
                   f"t_{RequestState.RECEIVED.value}": repr(now)}
        mapping.update({k: str(v) for k, v in fields.items()})
        event = json.dumps({"state": RequestState.RECEIVED.value, "ts": now})
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(record_key(request_id), mapping=mapping)
        pipe.pexpire(record_key(request_id), self._live_ttl_ms)
        pipe.rpush(events_key(request_id), event)
        pipe.pexpire(events_key(request_id), self._live_ttl_ms)
        pipe.zadd(active_key(self.router_id), {request_id: now})
        for step in then:
            self._queue_transition(pipe, request_id, step.to, None, step.fields)
        replies = await pipe.execute()
        self._check(request_id, replies[5:], [step.to for step in then])

    async def transition(self, request_id: str, *, to: RequestState, handle: bytes | None = None,
                         **fields: str | int | float) -> RequestState:
        """Move `request_id` to `to` (atomically, checked against ALLOWED); returns the previous state.

        Raises TransitionRefused when the edge does not exist from the current state.
        """
        keys, args = self._script_call(request_id, to, handle, fields)
        reply = await self._script(keys=keys, args=args)
        return self._check(request_id, [reply], [to])[0]

    async def transitions(self, request_id: str, steps: Sequence[Step]) -> None:
        """`transition` for each of `steps` in order, in one round trip, none interleaved with another client's
        (MULTI/EXEC). Each step checks its own edge: a refused one does not stop the ones after it that are
        allowed from the state it left (none, when the record is missing). Raises TransitionRefused for the
        first step refused. The caller (router/record_writer.py) sends steps that follow from what Redis holds."""
        if len(steps) == 1:
            await self.transition(request_id, to=steps[0].to, handle=steps[0].handle, **steps[0].fields)
            return
        pipe = self._redis.pipeline(transaction=True)
        for step in steps:
            self._queue_transition(pipe, request_id, step.to, step.handle, step.fields)
        self._check(request_id, await pipe.execute(), [step.to for step in steps])

    def _script_call(self, request_id: str, to: RequestState, handle: bytes | None,
                     fields: Mapping[str, str | int | float]) -> tuple[list[str], list[Any]]:
        now = time.time()
        flat: list[str] = []
        for k, v in fields.items():
            flat += [k, str(v)]
        event = json.dumps({"state": to.value, "ts": now, **fields})
        terminal_ms = self._retention_ms if to in TERMINAL else 0
        args: list[Any] = [to.value, ",".join(s.value for s in sources_of(to)), repr(now), event,
                           str(terminal_ms), str(self._handle_ttl_ms), str(len(fields)),
                           handle if handle is not None else b""]
        args += flat + [request_id, str(FINISHED_MAXLEN)]
        keys = [record_key(request_id), events_key(request_id), active_key(self.router_id),
                handle_key(request_id), finished_key()]
        return keys, args

    def _queue_transition(self, pipe: Any, request_id: str, to: RequestState, handle: bytes | None,
                          fields: Mapping[str, str | int | float]) -> None:
        keys, args = self._script_call(request_id, to, handle, fields)
        # EVAL with the script's text, not EVALSHA: a pipeline holding a registered script first asks the
        # server whether it exists (SCRIPT EXISTS), one more round trip on every create. The server caches
        # the compiled script by its hash either way.
        pipe.eval(_TRANSITION_LUA, len(keys), *keys, *args)

    @staticmethod
    def _check(request_id: str, replies: list[Any], targets: list[RequestState]) -> list[RequestState]:
        previous = []
        for (status, prev), to in zip(replies, targets, strict=True):
            if as_text(status) != "ok":
                raise TransitionRefused(request_id, as_text(prev) or None, to)
            previous.append(RequestState(as_text(prev)))
        return previous

    async def try_settle(self, request_id: str, *, to: RequestState, **fields: str | int | float) -> bool:
        """Move to a terminal state unless the request already is in one; True when this call did it."""
        try:
            await self.transition(request_id, to=to, handle=None, **fields)
        except TransitionRefused:
            return False
        return True

    async def get(self, request_id: str) -> RequestRecord | None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(record_key(request_id))
        pipe.lrange(events_key(request_id), 0, -1)
        raw, events = await pipe.execute()
        if not raw:
            return None
        fields = {as_text(k): as_text(v) for k, v in raw.items()}
        return RequestRecord(request_id, RequestState(fields["state"]), fields,
                             [json.loads(e) for e in events])

    async def get_handle(self, request_id: str) -> bytes | None:
        raw = await self._redis.get(handle_key(request_id))
        return None if raw is None else bytes(raw)

    async def active_ids(self, router_id: str | None = None) -> list[str]:
        """Unfinished requests owned by `router_id` (default: this router)."""
        return [as_text(m) for m in await self._redis.zrange(active_key(router_id or self.router_id), 0, -1)]

    async def settle_orphans(self, reason: str) -> list[str]:
        """Fail every request this router left unfinished (it restarted: their streams are gone)."""
        settled: list[str] = []
        for request_id in await self.active_ids():
            if await self.try_settle(request_id, to=RequestState.FAILED, error=reason):
                settled.append(request_id)
            else:  # already terminal (or expired): only the index entry is stale
                await self._redis.zrem(active_key(self.router_id), request_id)
        if settled:
            log.warning("settled %d unfinished requests of router %s: %s", len(settled), self.router_id, reason)
        return settled
