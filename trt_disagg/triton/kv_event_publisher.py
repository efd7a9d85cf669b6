"""Publishes one instance's KV cache events (trt_disagg.kv_events) to the deployment's Redis stream.

    start():  snapshot {cleared, seq 1}, XADD cleared     a (re)start: readers drop what they knew of us
    every interval_s (own thread):
      hashes, changes = engine.cached_block_hashes()   (atomic: changes up to now, the set after them)
      XADD each change as stored/removed (seq+1 ...)   MAXLEN ~ event_buffer_max_size
      SET kv_snapshot:<id> = stored{every hash}, seq   at most every snapshot_interval_s, and on stop
    stop():   a last publish + snapshot; the registry purge tells readers when we are gone

The engine records changes as they happen (prefix_cache.CacheChange); publishing them from this thread
keeps Redis off the engine's step loop. A reader that sees a gap in `seq` (events trimmed from the bounded
stream) reloads the snapshot, which is always current to some seq of the same epoch.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

from trt_disagg.keys import kv_events_key, kv_snapshot_key
from trt_disagg.kv_events import KVEvent, KVEventKind

log = logging.getLogger(__name__)


class CacheChangeLike(Protocol):
    kind: KVEventKind
    blocks: tuple[int, ...]
    parent: int | None


class ReusingEngine(Protocol):
    """What the publisher needs of an engine (LLMEngine has it; the fake engine does not reuse blocks)."""

    @property
    def tokens_per_block(self) -> int: ...
    def cached_block_hashes(self) -> tuple[list[int], list[Any]]: ...


class KVEventPublisher:
    def __init__(self, client: Any, instance_id: str, engine: ReusingEngine, *, max_stream_len: int,
                 interval_s: float = 0.05, snapshot_interval_s: float = 1.0) -> None:
        self._client = client
        self.instance_id = instance_id
        self._engine = engine
        self._max_len = max_stream_len
        self._interval_s = interval_s
        self._snapshot_interval_s = snapshot_interval_s
        self.epoch = time.time_ns() // 1_000_000
        self.seq = 0
        self._snapshot_at = 0.0
        self._snapshot_seq = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.announce()
        self._thread = threading.Thread(target=self._run, name=f"kv-events-{self.instance_id}", daemon=True)
        self._thread.start()

    def announce(self) -> None:
        """This run starts empty: `cleared` (seq 1 of a new epoch) and an empty snapshot."""
        self._publish([self._event(KVEventKind.CLEARED)], [])

    def stop(self) -> None:
        """Publish what is left, then stop; tolerates Redis already gone. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            self._safe_publish_once(force_snapshot=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._safe_publish_once()

    def _safe_publish_once(self, force_snapshot: bool = False) -> None:
        try:
            self.publish_once(force_snapshot)
        except Exception:  # a Redis hiccup: readers see the seq gap and reload the snapshot
            log.warning("publishing KV events of %s failed", self.instance_id, exc_info=True)

    def publish_once(self, force_snapshot: bool = False) -> int:
        """Publish the engine's changes since the last call; returns how many events went out."""
        hashes, changes = self._engine.cached_block_hashes()
        events = [self._change_event(c) for c in changes if c.blocks]
        now = time.monotonic()
        due = force_snapshot or (now - self._snapshot_at >= self._snapshot_interval_s and self.seq != self._snapshot_seq)
        if events or due:
            self._publish(events, hashes if (due or not self._snapshot_at) else None)
        return len(events)

    def _event(self, kind: KVEventKind, blocks: tuple[int, ...] = (), parent: int | None = None) -> KVEvent:
        self.seq += 1
        tpb = self._engine.tokens_per_block if kind is KVEventKind.STORED else 0
        return KVEvent(self.instance_id, self.seq, kind, blocks, parent, tpb, epoch=self.epoch)

    def _change_event(self, change: CacheChangeLike) -> KVEvent:
        return self._event(change.kind, tuple(change.blocks), change.parent)

    def snapshot_event(self, hashes: list[int]) -> KVEvent:
        """Every cached hash as one stored event, current to the last published seq (not a new seq)."""
        return KVEvent(self.instance_id, max(self.seq, 1), KVEventKind.STORED, tuple(hashes), None,
                       self._engine.tokens_per_block, epoch=self.epoch)

    def _publish(self, events: list[KVEvent], snapshot_hashes: list[int] | None) -> None:
        pipe = self._client.pipeline(transaction=False)
        for ev in events:
            pipe.xadd(kv_events_key(), {"e": ev.to_json()}, maxlen=self._max_len, approximate=True)
        if snapshot_hashes is not None:
            pipe.set(kv_snapshot_key(self.instance_id), self.snapshot_event(snapshot_hashes).to_json())
            self._snapshot_at = time.monotonic()
            self._snapshot_seq = self.seq
        pipe.execute()
