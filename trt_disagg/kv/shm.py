"""Same-host KV pulls through a POSIX shared-memory segment (/dev/shm).

The prefill side takes a segment from its `SegmentPool` (multiprocessing.shared_memory: the resource
tracker unlinks it even if the process dies), writes the shards into it (at pull time, or ahead of the
pull: `StagedKV`), and sends only its name and offsets over the control socket; the decode side maps it
read-only, copies the bytes out and ACKs; the segment then goes back to the pool. Why a pool: a fresh tmpfs segment costs a page fault and a zeroed
page per 4 KiB (measured: writing 90 MiB into a new segment 97 ms, into a warm one 25 ms). The pool keeps
at most `max_idle_bytes` of idle segments and unlinks everything on `close()`; one segment serves one
pull at a time, so concurrent pulls never share bytes.
The reader maps /dev/shm/<name> itself instead of attaching with SharedMemory: before Python 3.13 an
attach registers the segment with the reader's resource tracker, which would then unlink (or warn about)
a segment it does not own. It keeps its mappings across pulls (`SegmentMaps`): the sender reuses its
segments, and mapping 22.5 MiB with MAP_POPULATE costs ~1.6 ms, a third of a warm 512-token pull. A
mapping whose segment was unlinked or replaced is closed at the next pull (its memory with it).
"""

from __future__ import annotations

import mmap
import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import shared_memory

import numpy as np
import torch

from trt_disagg.kv import wire
from trt_disagg.kv.tcp import TcpKVReceiver

SEGMENT_PREFIX = "trtd_kv_"


SHM_DIR = "/dev/shm"


class Segment:
    """A shared-memory segment this process created (and unlinks on close)."""

    def __init__(self, shm: shared_memory.SharedMemory) -> None:
        self._shm = shm

    @classmethod
    def create(cls, nbytes: int, prefix: str = SEGMENT_PREFIX) -> Segment:
        import secrets

        if not prefix.startswith(SEGMENT_PREFIX):
            raise ValueError(f"KV segment prefix {prefix!r} must start with {SEGMENT_PREFIX!r}")
        name = prefix + secrets.token_hex(8)
        return cls(shared_memory.SharedMemory(name=name, create=True, size=max(nbytes, 1)))

    def _buf(self) -> memoryview:
        if self._shm.buf is None:
            raise ValueError(f"shm segment {self.name} is closed")
        return self._shm.buf

    @property
    def name(self) -> str:
        return self._shm.name

    @property
    def size(self) -> int:
        return self._shm.size

    def write_at(self, offset: int, t: torch.Tensor) -> None:
        """Copy one (contiguous) tensor's bytes to `offset`."""
        buf = np.frombuffer(self._buf(), dtype=np.uint8)
        try:
            src = np.asarray(wire.byte_view(t))
            buf[offset:offset + src.size] = src
        finally:
            del buf  # release the export of shm.buf, else close() fails

    def zero(self) -> None:
        """Write every byte (faults every page in)."""
        buf = np.frombuffer(self._buf(), dtype=np.uint8)
        try:
            buf[:] = 0
        finally:
            del buf

    def close(self) -> None:
        self._shm.close()
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SegmentPool:
    """Idle segments for reuse, bounded in bytes; thread-safe (one KV-server thread per pull)."""

    def __init__(self, max_idle_bytes: int = 256 << 20, prefix: str = SEGMENT_PREFIX) -> None:
        self.max_idle_bytes = max_idle_bytes
        self.prefix = prefix  # per instance, so a supervisor can remove them after a SIGKILL
        self._idle: list[Segment] = []
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self, nbytes: int) -> Segment:
        with self._lock:
            fits = [s for s in self._idle if s.size >= nbytes]
            if fits:
                seg = min(fits, key=lambda s: s.size)
                self._idle.remove(seg)
                return seg
        return Segment.create(nbytes, self.prefix)

    def prewarm(self, nbytes: int) -> None:
        """Create one idle segment of `nbytes` and touch every page now, at start-up: a segment's first
        write pays a page fault and a zeroed page per 4 KiB (on a VM whose memory the host backs lazily,
        measured 173 ms for 22.5 MiB), which would otherwise land on the first hand-offs."""
        if nbytes <= 0:
            return
        seg = Segment.create(nbytes, self.prefix)
        seg.zero()
        self.release(seg)

    def release(self, seg: Segment) -> None:
        with self._lock:
            if not self._closed and seg.size + sum(s.size for s in self._idle) <= self.max_idle_bytes:
                self._idle.append(seg)
                return
        seg.close()

    def close(self) -> None:
        """Unlink every idle segment; segments in use are unlinked when released."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for seg in idle:
            seg.close()


def layer_chunks(shards: list[torch.Tensor]) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Shard byte offsets in a segment, and the copy order: (shard index, layer, byte offset) per layer."""
    offsets: list[int] = []
    chunks: list[tuple[int, int, int]] = []
    pos = 0
    for i, t in enumerate(shards):
        offsets.append(pos)
        layer_bytes = t[0].numel() * t.element_size()
        chunks.extend((i, layer, pos + layer * layer_bytes) for layer in range(t.shape[0]))
        pos += t.numel() * t.element_size()
    return offsets, chunks


def stream_to_segment(sock: socket.socket, seg: Segment, shards: list[torch.Tensor]) -> None:
    """Sender side, pipelined: write layer by layer and say "ready" after each, so the receiver copies
    layer k out while layer k+1 is written (two processes, two cores)."""
    offsets, chunks = layer_chunks(shards)
    wire.send_header(sock, {"op": "shm", "name": seg.name, "offsets": offsets})
    per_ready = ready_batch(len(chunks))
    for k, (i, layer, offset) in enumerate(chunks, start=1):
        seg.write_at(offset, shards[i][layer])
        if k % per_ready == 0 or k == len(chunks):
            wire.send_header(sock, {"op": "ready", "upto": k})


class StagedKV:
    """An offer's KV copied into a pooled segment ahead of its pull (the sender's stager thread, right after
    the offer), so that an shm pull finds the bytes written, or follows the copy as it goes, instead of
    writing them while the decode instance waits. Owned by its offer: `retire()` when the offer goes
    (pulled, expired, released); the segment returns to the pool once the writer has stopped too."""

    def __init__(self, pool: SegmentPool, seg: Segment, shards: list[torch.Tensor]) -> None:
        self._pool = pool
        self.seg = seg
        self.offsets, self.chunks = layer_chunks(shards)
        self.nbytes = sum(t.numel() * t.element_size() for t in shards)
        self._shards = shards
        self.upto = 0  # layers written
        self.failed = False
        self._writing = False  # the writer holds the segment: retire() leaves giving it back to the writer
        self._done = False  # the writer has finished, failed, or will never start
        self._retired = False
        self._cond = threading.Condition()

    def write(self) -> None:
        """Copy every layer in (the stager thread); stops early when the offer was retired meanwhile."""
        with self._cond:
            if self._retired:  # gone before the copy began: retire() gave the segment back already
                self._done = True
                self._cond.notify_all()
                return
            self._writing = True
        try:
            for k, (i, layer, offset) in enumerate(self.chunks, start=1):
                if self._retired:
                    break
                self.seg.write_at(offset, self._shards[i][layer])
                with self._cond:
                    self.upto = k
                    self._cond.notify_all()
        except Exception:
            self.failed = True
            raise
        finally:
            with self._cond:
                self._writing, self._done, self._shards = False, True, []
                give_back = self._retired
                self._cond.notify_all()
            if give_back:
                self._pool.release(self.seg)

    def wait_for(self, layers: int, timeout_s: float) -> None:
        """Block until `layers` layers are written; ValueError when the copy failed, stopped or timed out."""
        with self._cond:
            self._cond.wait_for(lambda: self.upto >= layers or self.failed or self._done or self._retired,
                                timeout=timeout_s)
            if self.upto < layers:
                raise ValueError(f"staging KV into shm segment {self.seg.name} stopped after {self.upto} layers")

    def retire(self) -> None:
        """The offer is gone: the segment goes back to the pool now, or when the writer stops. Idempotent."""
        with self._cond:
            if self._retired:
                return
            self._retired = True
            give_back = not self._writing
            self._cond.notify_all()
        if give_back:
            self._pool.release(self.seg)


def stream_staged(sock: socket.socket, staged: StagedKV, timeout_s: float) -> None:
    """Sender side of an shm pull whose bytes were staged ahead: the segment's name, then "ready" as the
    stager's progress allows (all at once when it has finished)."""
    wire.send_header(sock, {"op": "shm", "name": staged.seg.name, "offsets": staged.offsets})
    n = len(staged.chunks)
    per_ready, k = ready_batch(n), 0
    while k < n:
        staged.wait_for(min(n, k + per_ready), timeout_s)
        k = staged.upto  # everything written so far in one message
        wire.send_header(sock, {"op": "ready", "upto": k})


def ready_batch(num_chunks: int, max_messages: int = 8) -> int:
    """Layers per "ready" message: enough overlap to pipeline, few enough wake-ups for small KVs."""
    return max(1, -(-num_chunks // max_messages))


class _Mapped:
    """One read-only mapping of a peer's segment, and the file identity it was made for."""

    def __init__(self, ident: tuple[int, int, int], mm: mmap.mmap) -> None:
        self.ident = ident  # (st_dev, st_ino, st_size)
        self.mm = mm
        self.array: np.ndarray | None = np.frombuffer(mm, dtype=np.uint8)
        self.users = 0

    def close(self) -> None:
        self.array = None  # the export of the mapping goes first, else close() fails
        self.mm.close()


class SegmentMaps:
    """The receiver's mappings of peers' segments, kept for the next pull of the same segment; thread-safe.

    At most `max_entries` are kept (least recently used go first). Before each pull, a kept mapping whose
    name is gone from /dev/shm or names another file now is closed, so an unlinked segment's memory is
    not held past the next pull; `clear()` closes every one not in use."""

    def __init__(self, max_entries: int = 8) -> None:
        self.max_entries = max_entries
        self._maps: OrderedDict[str, _Mapped] = OrderedDict()
        self._lock = threading.Lock()
        self.num_mapped = 0  # mappings made (not reused) since start: what the tests and the bench read

    @contextmanager
    def mapped(self, name: str, reuse: bool = True) -> Iterator[_Mapped]:
        """The segment `name`, mapped read-only; with `reuse` False a fresh mapping closed after use."""
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY)
        try:
            st = os.fstat(fd)
            ident = (st.st_dev, st.st_ino, st.st_size)
            entry = self._checkout(name, ident) if reuse else None
            if entry is None:
                # MAP_POPULATE: map every page in one call instead of one fault per 4 KiB while copying.
                entry = _Mapped(ident, mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                                 prot=mmap.PROT_READ))
                entry.users = 1
                with self._lock:
                    self.num_mapped += 1
                    if reuse and name not in self._maps and self.max_entries > 0:
                        self._maps[name] = entry
        finally:
            os.close(fd)
        try:
            yield entry
        finally:
            self._checkin(name, entry)

    def _checkout(self, name: str, ident: tuple[int, int, int]) -> _Mapped | None:
        with self._lock:
            self._prune()
            entry = self._maps.get(name)
            if entry is None or entry.ident != ident:
                return None
            entry.users += 1
            self._maps.move_to_end(name)
            return entry

    def _checkin(self, name: str, entry: _Mapped) -> None:
        with self._lock:
            entry.users -= 1
            kept = self._maps.get(name) is entry
            while len(self._maps) > self.max_entries:
                idle = next((n for n, e in self._maps.items() if e.users == 0), None)
                if idle is None:
                    break
                self._maps.pop(idle).close()
            if not kept and entry.users == 0:
                entry.close()

    def _prune(self) -> None:
        """Close kept mappings (not in use) whose segment was unlinked or replaced (lock held)."""
        for name, entry in list(self._maps.items()):
            if entry.users:
                continue
            try:
                st = os.stat(os.path.join(SHM_DIR, name))
                current = (st.st_dev, st.st_ino, st.st_size)
            except OSError:
                current = None
            if current != entry.ident:
                self._maps.pop(name).close()

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._maps

    def __len__(self) -> int:
        with self._lock:
            return len(self._maps)

    def clear(self) -> None:
        """Close every kept mapping not in use (one in use is closed when its pull ends)."""
        with self._lock:
            for name, entry in list(self._maps.items()):
                if entry.users == 0:
                    self._maps.pop(name).close()


# One per process: a decode instance makes a receiver per pull, and the mappings outlive each receiver.
SEGMENT_MAPS = SegmentMaps()


def receive_from_segment(sock: socket.socket, name: str, shards: list[torch.Tensor], reuse: bool = True) -> None:
    """Receiver side: map the peer's segment read-only (no resource tracker; the mapping is kept for the
    next pull unless `reuse` is False) and copy each layer out as soon as the sender says it is ready."""
    if not name.startswith(SEGMENT_PREFIX) or "/" in name:
        raise ValueError(f"refusing to read shm segment {name!r}: not a KV segment")
    _, chunks = layer_chunks(shards)
    with SEGMENT_MAPS.mapped(name, reuse) as seg:
        if chunks and chunks[-1][2] + shards[chunks[-1][0]][0].numel() * shards[0].element_size() > seg.ident[2]:
            raise ValueError(f"shm segment {name} is smaller than its shards")
        done = 0
        while done < len(chunks):
            msg = wire.recv_header(sock)
            upto = int(msg.get("upto", -1))
            if msg["op"] != "ready" or not done < upto <= len(chunks):
                raise ValueError(f"KV protocol error: expected 'ready' after {done} layers, got {msg}")
            for i, layer, offset in chunks[done:upto]:
                dst = np.asarray(wire.byte_view(shards[i][layer]))
                assert seg.array is not None
                dst[...] = seg.array[offset:offset + dst.size]
            done = upto


class ShmKVReceiver(TcpKVReceiver):
    """Pulls over the same control connection as tcp, but the bytes come through /dev/shm."""

    mode = "shm"

    def _receive_shards(self, sock: socket.socket, shards: list[torch.Tensor]) -> None:
        msg = self._expect(sock, "shm")
        receive_from_segment(sock, str(msg["name"]), shards, self._reuse)
