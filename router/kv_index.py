"""The router's block index: which instance holds which prefix block, fed by the instances' KV events.

    instances ──XADD──▶ trtd:kv_events (bounded stream)     ──XREAD──▶ KVEventFollower.poll ─▶ KVIndex.apply
              ──SET───▶ trtd:kv_snapshot:<id> (every ~1 s)  ──GET───▶ KVEventFollower.sync ─▶ KVIndex.load_snapshot
    registry (every refresh) ─▶ sync(members): purge who left, snapshot who is new or out of step

Per instance the index keeps (epoch, seq, hashes). An event is applied only when it is the next one of the
run the index follows; anything else is counted and handled without trusting it:
  next seq of the same epoch        applied (stored adds, removed drops, cleared empties)
  a lower epoch or an old seq       ignored (stale / duplicate: a re-read stream or a replayed snapshot)
  cleared seq 1 of a higher epoch   the instance restarted: it starts over, empty
  a gap, or an unknown run          the instance is "out of step": its events wait in a bounded buffer until
                                    its snapshot covers the gap (the snapshot is reloaded at each sync)
  not JSON / bad fields             malformed: counted, skipped
  no such registered instance       unknown_instance: dropped at the next sync
  more blocks than it has room for  over_capacity (forged or corrupt): the instance is re-read from its snapshot
  a block size it did not announce  forged: skipped
So a client writing to the stream can waste a few counters, never crash the router or grow the index past
each registered instance's KV capacity.

`matched_tokens(info, prompt)` is the KV-aware policy's question: how many leading prompt tokens does this
instance hold (whole blocks of its prefix chain, named as `trt_disagg.kv_events.block_hashes` names them).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trt_disagg.contract import InstanceInfo
from trt_disagg.keys import as_text, kv_events_key, kv_snapshot_key
from trt_disagg.kv_events import KVEvent, KVEventKind, block_hashes

log = logging.getLogger(__name__)

MAX_PENDING_EVENTS = 4096  # per out-of-step instance, until its snapshot catches up
MAX_PENDING_INSTANCES = 256  # ids with buffered events (unknown ones are dropped at each sync)


@dataclass
class _Holding:
    epoch: int
    seq: int
    tokens_per_block: int = 0  # 0 until its first stored event or snapshot says
    hashes: set[int] = field(default_factory=set)


class KVIndex:
    """Pure in-memory index (no I/O): events and snapshots in, overlap answers out."""

    def __init__(self) -> None:
        self._held: dict[str, _Holding] = {}
        self._capacity: dict[str, int] = {}  # registered instances: KV tokens each can hold at most
        self._pending: dict[str, deque[KVEvent]] = {}  # out-of-step instances: events after the gap
        self.counts: Counter[str] = Counter()

    # -- membership ---------------------------------------------------------------------------------------

    def set_members(self, capacity_tokens: Mapping[str, int]) -> list[str]:
        """The registered instances and their KV capacity; everyone else is purged. Returns those that need
        their snapshot (new, or out of step)."""
        self._capacity = dict(capacity_tokens)
        for iid in [i for i in self._held if i not in self._capacity]:
            self.purge(iid)
        for iid in [i for i in self._pending if i not in self._capacity]:
            self.counts["unknown_instance"] += len(self._pending.pop(iid))
        return [i for i in self._capacity if i not in self._held or i in self._pending]

    def purge(self, instance_id: str) -> None:
        self._held.pop(instance_id, None)
        self._pending.pop(instance_id, None)

    def instances(self) -> list[str]:
        return list(self._held)

    def hashes_of(self, instance_id: str) -> frozenset[int]:
        h = self._held.get(instance_id)
        return frozenset(h.hashes) if h is not None else frozenset()

    def num_blocks(self) -> dict[str, int]:
        return {iid: len(h.hashes) for iid, h in self._held.items()}

    # -- events -------------------------------------------------------------------------------------------

    def apply_raw(self, raw: str | bytes) -> str:
        try:
            event = KVEvent.from_json(raw)
        except ValueError:
            self.counts["malformed"] += 1
            return "malformed"
        return self.apply(event)

    def apply(self, ev: KVEvent) -> str:
        outcome = self._apply(ev)
        self.counts[outcome] += 1
        return outcome

    def _apply(self, ev: KVEvent) -> str:
        iid = ev.instance_id
        held = self._held.get(iid)
        if iid in self._pending or held is None or ev.epoch > held.epoch:
            if ev.kind is KVEventKind.CLEARED and ev.seq == 1 and (held is None or ev.epoch > held.epoch):
                if iid not in self._capacity:
                    return self._buffer(ev, "unknown_instance")
                self._pending.pop(iid, None)
                self._held[iid] = _Holding(ev.epoch, ev.seq)  # a (re)start: empty, and in step from here
                return "applied"
            return self._buffer(ev, "out_of_step")
        if ev.epoch < held.epoch or ev.seq <= held.seq:
            return "stale"
        if ev.seq > held.seq + 1:
            return self._buffer(ev, "gap")
        return self._change(held, ev)

    def _buffer(self, ev: KVEvent, outcome: str) -> str:
        queue = self._pending.get(ev.instance_id)
        if queue is None:
            if len(self._pending) >= MAX_PENDING_INSTANCES:
                return "dropped"
            queue = self._pending[ev.instance_id] = deque(maxlen=MAX_PENDING_EVENTS)
        queue.append(ev)
        return outcome

    def _change(self, held: _Holding, ev: KVEvent) -> str:
        if ev.kind is KVEventKind.STORED:
            if held.tokens_per_block and ev.tokens_per_block != held.tokens_per_block:
                return "forged"
            new = sum(1 for b in set(ev.blocks) if b not in held.hashes)
            if (len(held.hashes) + new) * ev.tokens_per_block > self._capacity.get(ev.instance_id, 0):
                self._pending.setdefault(ev.instance_id, deque(maxlen=MAX_PENDING_EVENTS))
                return "over_capacity"  # re-read from the snapshot at the next sync
            held.tokens_per_block = ev.tokens_per_block
            held.hashes.update(ev.blocks)
        elif ev.kind is KVEventKind.REMOVED:
            held.hashes.difference_update(ev.blocks)
        else:
            held.hashes.clear()
        held.seq = ev.seq
        return "applied"

    def load_snapshot(self, snap: KVEvent) -> bool:
        """Adopt an instance's snapshot, then the buffered events that follow it; False when the buffer
        still has a gap after it (try again at the next sync: the snapshot is refreshed every second)."""
        iid = snap.instance_id
        capacity = self._capacity.get(iid)
        if capacity is None or snap.kind is not KVEventKind.STORED:
            self.counts["forged"] += 1
            return False
        held = self._held.get(iid)
        if held is not None and iid not in self._pending and (snap.epoch, snap.seq) <= (held.epoch, held.seq):
            return True  # already at least as current
        if len(set(snap.blocks)) * snap.tokens_per_block > capacity:
            self.counts["over_capacity"] += 1
            return False
        self._held[iid] = _Holding(snap.epoch, snap.seq, snap.tokens_per_block, set(snap.blocks))
        pending = self._pending.pop(iid, deque())
        for ev in sorted(pending, key=lambda e: (e.epoch, e.seq)):
            self.apply(ev)
        self.counts["snapshots"] += 1
        return iid not in self._pending

    # -- the policy's question ----------------------------------------------------------------------------

    def matched_tokens(self, info: InstanceInfo, prompt_ids: Sequence[int],
                       memo: dict[tuple[str, int], list[int]] | None = None) -> int:
        """Leading prompt tokens whose blocks `info`'s instance holds (whole blocks; 0 when unknown)."""
        held = self._held.get(info.instance_id)
        if held is None or not held.tokens_per_block or not held.hashes:
            return 0
        key = (info.fingerprint, held.tokens_per_block)
        memo = {} if memo is None else memo
        if key not in memo:  # one hash chain per model and block size, whatever the number of instances
            memo[key] = block_hashes(prompt_ids, held.tokens_per_block, info.fingerprint.encode())
        n = 0
        for h in memo[key]:
            if h not in held.hashes:
                break
            n += 1
        return n * held.tokens_per_block


class KVEventFollower:
    """Feeds a KVIndex from Redis: the stream (XREAD from where it left off) and the snapshots."""

    def __init__(self, redis: Any, index: KVIndex, batch: int = 1000) -> None:
        self._redis = redis
        self.index = index
        self._batch = batch
        self._last_id = "0"  # a new router reads the whole (bounded) stream once; old events are stale

    async def sync(self, members: Iterable[InstanceInfo]) -> None:
        """Follow the registry: purge instances that left, load the snapshot of new or out-of-step ones."""
        need = self.index.set_members({i.instance_id: i.kv_capacity_tokens for i in members})
        if not need:
            return
        raws = await self._redis.mget([kv_snapshot_key(i) for i in need])
        for iid, raw in zip(need, raws, strict=True):
            if raw is None:
                continue
            try:
                snap = KVEvent.from_json(raw)
            except ValueError:
                self.index.counts["malformed"] += 1
                continue
            if snap.instance_id != iid:
                self.index.counts["forged"] += 1
                continue
            self.index.load_snapshot(snap)

    async def poll(self, block_ms: int | None = None) -> int:
        """Apply the events appended since the last poll (waiting up to `block_ms` for one); returns how many."""
        reply = await self._redis.xread({kv_events_key(): self._last_id}, count=self._batch, block=block_ms)
        n = 0
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                self._last_id = as_text(entry_id)
                raw = fields.get(b"e", fields.get("e")) if isinstance(fields, dict) else None
                if raw is None:
                    self.index.counts["malformed"] += 1
                else:
                    self.index.apply_raw(raw)
                n += 1
        return n
