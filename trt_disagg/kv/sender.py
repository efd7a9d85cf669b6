"""The prefill instance's KV server: holds offered KV, serves pulls over TCP or shm, frees on ACK or expiry.

    offer(rid) ─▶ PENDING ──pull starts──▶ SENDING ──ACK──▶ released (engine.release_kv)
                    ▲  │                      │
                    │  ├─ TTL passed ─▶ released   (a reaper thread, checked every reap_interval_s)
                    │  └─ release op ─▶ released   (the router gave the request up before a decode pulled)
                    └──── pull failed ───────┘     (the decode side may retry until the TTL; a release op
                                                    that came during the pull frees it instead)

One thread per connection (socketserver), one reaper thread, one stager thread. The handle is verified
again here (the receiver already did): this port is reachable from the network and must not trust its peers.

Staging ahead (`eager_stage`): once this instance has served an shm pull (its decode instances share the
host), each new offer's KV is copied into a pooled shm segment by the stager thread right after the offer,
while the router dispatches the decode request; the pull then only names the segment (shm.StagedKV). The
copy (~3 ms for 22.5 MiB here) thus leaves the hand-off's critical path. At most `max_staged_bytes` are
staged at once; beyond that, and for TCP pulls, the bytes are written at pull time.
"""

from __future__ import annotations

import enum
import logging
import queue
import socket
import socketserver
import threading
import time
from dataclasses import dataclass

from trt_disagg.contract import KVLayout
from trt_disagg.exported_kv import ExportedKV
from trt_disagg.kv import shm, wire
from trt_disagg.kv.errors import InvalidHandleError, WireErrorKind, wire_kind_of
from trt_disagg.kv.handle import KVHandle, decode_handle, verify_handle
from trt_disagg.kv.transport import KVSource, issue_handle

log = logging.getLogger(__name__)

SOCKET_BUFFER_BYTES = 4 << 20


class OfferState(enum.Enum):
    PENDING = "pending"
    SENDING = "sending"


@dataclass
class _Offer:
    handle: KVHandle
    state: OfferState
    release_requested: bool = False  # a release op came while SENDING: free it if the pull fails
    staged: shm.StagedKV | None = None  # its bytes, copied into a segment ahead of the pull


class SocketKVSender:
    """KVSender over a TCP listening socket (bytes inline for tcp pulls, in /dev/shm for shm pulls)."""

    def __init__(self, source: KVSource, secret: bytes, instance_id: str, layout: KVLayout,
                 host: str = "127.0.0.1", port: int = 0, advertise_host: str | None = None,
                 handle_ttl_s: float = 60.0, max_pending_tokens: int | None = None,
                 ack_timeout_s: float = 30.0, reap_interval_s: float = 0.5,
                 shm_prefix: str | None = None, prewarm_tokens: int = 0, eager_stage: bool = True,
                 max_staged_bytes: int = 256 << 20) -> None:
        self._source = source
        self._prewarm_tokens = prewarm_tokens  # a shm segment this many tokens' KV large is faulted in at start
        self._secret = secret
        self.instance_id = instance_id
        self.layout = layout
        self._bind = (host, port)
        self._advertise_host = advertise_host or host
        self.handle_ttl_s = handle_ttl_s
        self.max_pending_tokens = max_pending_tokens
        self._ack_timeout_s = ack_timeout_s
        self._reap_interval_s = reap_interval_s
        self._offers: dict[str, _Offer] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: socketserver.ThreadingTCPServer | None = None
        self._threads: list[threading.Thread] = []
        self._segments = shm.SegmentPool(prefix=shm_prefix or shm.SEGMENT_PREFIX)
        self._eager_stage = eager_stage
        self._max_staged_bytes = max_staged_bytes
        self._staged_bytes = 0  # of offers staged ahead now (under _lock)
        self._shm_pulls_seen = False  # staging ahead pays only where decode instances pull over shm
        self._stage_queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    # ---- lifecycle ----
    def start(self) -> None:
        sender = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sender._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(self._bind, Handler)
        self._segments.prewarm(self._prewarm_tokens * _kv_bytes_per_token(self.layout))
        for target, name in ((self._serve_forever, "kv-server"), (self._reap_loop, "kv-reaper"),
                             (self._stage_loop, "kv-stager")):
            t = threading.Thread(target=target, name=f"{name}-{self.instance_id}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("KV server of %s at %s", self.instance_id, self.url)

    def _serve_forever(self) -> None:
        if self._server is not None:
            self._server.serve_forever(poll_interval=0.05)  # shutdown() waits at most one poll

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("KV server not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"tcp://{self._advertise_host}:{self.port}"

    def close(self) -> None:
        """Stop serving and release every offer still held; idempotent."""
        self._stop.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        self._stage_queue.put(None)
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        with self._lock:
            ids = list(self._offers)
        for rid in ids:
            self.release(rid)
        self._segments.close()

    # ---- KVSender ----
    def can_admit(self, num_tokens: int) -> bool:
        if self.max_pending_tokens is None:
            return True
        return self.pending_tokens() + num_tokens <= self.max_pending_tokens

    def offer(self, request_id: str, num_tokens: int, first_token: int,
              block_ids: tuple[int, ...] = ()) -> KVHandle:
        handle = issue_handle(self, request_id, num_tokens, first_token, block_ids)
        with self._lock:
            self._offers[request_id] = _Offer(handle, OfferState.PENDING)
        if self._eager_stage and self._shm_pulls_seen:
            self._stage_queue.put(request_id)
        return handle

    def release(self, request_id: str) -> None:
        with self._lock:
            offer = self._offers.pop(request_id, None)
            if offer is not None and offer.staged is not None:
                self._staged_bytes -= offer.staged.nbytes
        if offer is not None:
            if offer.staged is not None:
                offer.staged.retire()
            self._source.release_kv(request_id)

    def release_handle(self, blob: bytes) -> bool:
        """The release op: free the KV that a signed handle of this instance names; True when it was held.

        Verified like a pull (HMAC, this instance) but not for expiry: an expired handle's KV goes back
        either way. Only the offer the handle was issued for is freed, never a newer offer of the same
        request id. During a pull the offer is marked and freed when the pull fails (an ACK frees it anyway).
        """
        handle = verify_handle(blob, self._secret)
        if handle.source_instance != self.instance_id:
            raise InvalidHandleError(f"handle names instance {handle.source_instance}, this is {self.instance_id}")
        with self._lock:
            offer = self._offers.get(handle.request_id)
            if offer is None or offer.handle != handle:
                return False
            if offer.state is OfferState.SENDING:
                offer.release_requested = True
                return True
        log.info("KV of %s released by its router before a pull", handle.request_id)
        self.release(handle.request_id)
        return True

    def pending_tokens(self) -> int:
        with self._lock:
            return sum(o.handle.num_tokens for o in self._offers.values())

    def num_pending(self) -> int:
        with self._lock:
            return len(self._offers)

    def staged_bytes(self) -> int:
        """Bytes of offers staged ahead in shm now (each goes back with its offer)."""
        with self._lock:
            return self._staged_bytes

    # ---- expiry ----
    def reap_expired(self, now: float | None = None) -> list[str]:
        """Release PENDING offers whose TTL passed; returns their ids."""
        now = time.time() if now is None else now
        with self._lock:
            gone = [rid for rid, o in self._offers.items()
                    if o.state is OfferState.PENDING and o.handle.expired(now)]
        for rid in gone:
            log.info("KV of %s expired un-pulled; released", rid)
            self.release(rid)
        return gone

    def _reap_loop(self) -> None:
        while not self._stop.wait(self._reap_interval_s):
            self.reap_expired()

    # ---- staging ahead ----
    def _stage_loop(self) -> None:
        while (request_id := self._stage_queue.get()) is not None:
            try:
                self._stage_one(request_id)
            except Exception as exc:  # the pull writes the bytes itself then
                log.warning("staging the KV of %s ahead failed: %s", request_id, exc)

    def _stage_one(self, request_id: str) -> None:
        """Copy a PENDING offer's KV into a segment, unless it is gone, being pulled, or over the cap."""
        with self._lock:
            offer = self._offers.get(request_id)
            if offer is None or offer.state is not OfferState.PENDING or offer.staged is not None:
                return
        kv = self._source.export_kv(request_id)
        shards = [kv.shards[r].contiguous() for r in sorted(kv.shards)]
        nbytes = sum(t.numel() * t.element_size() for t in shards)
        with self._lock:
            if self._staged_bytes + nbytes > self._max_staged_bytes:
                return
            self._staged_bytes += nbytes  # reserved before the segment exists: the cap holds under races
        staged = shm.StagedKV(self._segments, self._segments.acquire(nbytes), shards)
        with self._lock:
            offer = self._offers.get(request_id)
            attach = offer is not None and offer.state is OfferState.PENDING and offer.staged is None
            if offer is not None and attach:
                offer.staged = staged
            else:
                self._staged_bytes -= nbytes
        if not attach:
            staged.retire()  # not written yet: the writer never starts, so the segment goes back now
            return
        staged.write()

    # ---- serving one pull ----
    def _claim(self, handle: KVHandle) -> str | None:
        """Move the offer to SENDING; returns why not when it cannot be served."""
        if handle.source_instance != self.instance_id:
            return f"handle names instance {handle.source_instance}, this is {self.instance_id}"
        with self._lock:
            offer = self._offers.get(handle.request_id)
            if offer is None:
                return f"request {handle.request_id} is not held here (already pulled, released or expired)"
            if offer.state is not OfferState.PENDING:
                return f"request {handle.request_id} is being pulled by another connection"
            offer.state = OfferState.SENDING
        return None

    def _unclaim(self, request_id: str) -> None:
        with self._lock:
            offer = self._offers.get(request_id)
            if offer is None:
                return
            offer.state = OfferState.PENDING
            if not offer.release_requested:
                return
        self.release(request_id)  # its router gave the request up during the failed pull

    def _serve(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        sock.settimeout(self._ack_timeout_s)
        try:
            req = wire.recv_header(sock)
            if req.get("op") not in ("fetch", "release"):
                raise ValueError(f"unexpected op {req.get('op')!r}")
            blob = bytes.fromhex(str(req["handle"]))
            if req["op"] == "release":
                return self._serve_release(sock, blob)
            handle = decode_handle(blob, self._secret)
        except InvalidHandleError as exc:  # expired, forged, or another instance's (or deployment's)
            log.warning("refused a KV request from %s: %s", _peer(sock), exc)
            return _send_error(sock, wire_kind_of(exc), str(exc))
        except (ValueError, KeyError, OSError) as exc:
            log.warning("refused a malformed KV request from %s: %s", _peer(sock), exc)
            return _send_error(sock, WireErrorKind.INTERNAL, f"bad KV request: {exc}")
        why = self._claim(handle)
        if why is not None:  # a replayed handle lands here: its KV was pulled (and freed) already
            log.warning("refused a KV pull from %s: %s", _peer(sock), why)
            return _send_error(sock, WireErrorKind.NOT_FOUND, why)
        mode = str(req.get("mode", "tcp"))
        self._shm_pulls_seen |= mode == "shm"  # only a pull of a real offer turns staging ahead on
        try:
            started = time.perf_counter()
            kv = self._source.export_kv(handle.request_id)
            acked = self._stream(sock, kv, mode, time.perf_counter() - started, self._staged_of(handle.request_id))
        except Exception as exc:
            log.warning("KV pull of %s failed: %s", handle.request_id, exc)
            self._unclaim(handle.request_id)  # before the error goes out: a retry must find it PENDING
            try:
                _send_error(sock, WireErrorKind.INTERNAL, f"prefill side failed while sending: {exc}")
            except OSError:
                pass
            return
        if not acked:
            self._unclaim(handle.request_id)
            return
        self.release(handle.request_id)  # free first, then confirm: when fetch() returns, the source is free
        try:
            wire.send_header(sock, {"op": "released"})
        except OSError:
            pass

    def _staged_of(self, request_id: str) -> shm.StagedKV | None:
        """The claimed offer's staged copy (a SENDING offer gets none attached from now on)."""
        with self._lock:
            offer = self._offers.get(request_id)
            return None if offer is None or offer.staged is None or offer.staged.failed else offer.staged

    def _serve_release(self, sock: socket.socket, blob: bytes) -> None:
        """Forged or foreign handles fall through to `_serve`'s FORGED error."""
        wire.send_header(sock, {"op": "released", "held": self.release_handle(blob)})

    def _stream(self, sock: socket.socket, kv: ExportedKV, mode: str, export_s: float,
                staged: shm.StagedKV | None = None) -> bool:
        """Send meta, the bytes (inline or via a shm segment) and "end"; True when the receiver ACKed.

        "end" carries this side's phase times (export, staging the bytes) so that the decode instance can
        log a hand-off's phases on both sides in one line."""
        started = time.perf_counter()
        ranks = sorted(kv.shards)
        shards = [kv.shards[r].contiguous() for r in ranks]
        wire.send_header(sock, {
            "op": "meta", "num_tokens": kv.num_tokens, "layout": kv.layout.to_dict(),
            "shards": [{"rank": r, "shape": list(t.shape), "dtype": wire.dtype_name(t.dtype)}
                       for r, t in zip(ranks, shards, strict=True)],
        })
        if mode == "shm" and staged is not None:  # written ahead (or being written): the offer owns it
            shm.stream_staged(sock, staged, self._ack_timeout_s)
            wire.send_header(sock, _end(export_s, time.perf_counter() - started))
            return wire.recv_header(sock).get("op") == "ack"
        if mode == "shm":
            # The segment is this pull's until the receiver has copied out and ACKed (or failed).
            seg = self._segments.acquire(sum(t.numel() * t.element_size() for t in shards))
            try:
                shm.stream_to_segment(sock, seg, shards)
                wire.send_header(sock, _end(export_s, time.perf_counter() - started))
                return wire.recv_header(sock).get("op") == "ack"
            finally:
                self._segments.release(seg)
        for t in shards:
            for layer in range(t.shape[0]):  # layer by layer: the receiver can start on layer 0 early
                sock.sendall(wire.byte_view(t[layer]))
        wire.send_header(sock, _end(export_s, time.perf_counter() - started))
        return wire.recv_header(sock).get("op") == "ack"


def _kv_bytes_per_token(layout: KVLayout) -> int:
    """K and V of every layer and head for one token, in the layout's dtype (all ranks together)."""
    return 2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * wire.dtype_of(layout.dtype).itemsize


def _end(export_s: float, stage_s: float) -> dict:
    return {"op": "end", "export_s": round(export_s, 6), "stage_s": round(stage_s, 6)}


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "a disconnected peer"
    return f"{host}:{port}"


def _send_error(sock: socket.socket, kind: WireErrorKind, message: str) -> None:
    wire.send_header(sock, {"op": "error", "kind": kind.value, "message": message})
