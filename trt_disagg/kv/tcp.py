"""Cross-host KV pulls over TCP: the decode side connects to the prefill instance's KV endpoint.

`fetch` sends the signed handle, receives the layout and shard shapes, then the raw bytes layer by layer
straight into the shards (`recv_into`, no intermediate copies), and ACKs so that the prefill side frees its
blocks. The shards are views into a receive buffer reused across pulls (kv/buffers.py): the consumer's
`ExportedKV.consumed()` gives it back. Every failure becomes a KVTransferError that names the source
instance and its URL.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass

import torch

from trt_disagg.contract import KVLayout
from trt_disagg.exported_kv import ExportedKV
from trt_disagg.kv import wire
from trt_disagg.kv.buffers import RECEIVE_BUFFERS, Lease, ShardSpec
from trt_disagg.kv.errors import KVTransferError, SourceUnreachableError, error_from_wire
from trt_disagg.kv.handle import KVHandle, encode_handle
from trt_disagg.kv.wire import parse_kv_url

log = logging.getLogger(__name__)

SOCKET_BUFFER_BYTES = 4 << 20


@dataclass(frozen=True)
class FetchTiming:
    """Where one pull's time went, both sides (seconds): what a hand-off's phase log is made of."""

    connect_s: float  # TCP connect to the prefill instance's KV server
    meta_s: float  # handle sent -> layout received: the source verified the handle and exported the KV
    data_s: float  # the bytes: staged by the source (shm) or sent inline, copied into fresh tensors here
    release_s: float  # ACK -> "released": the source freed its blocks
    source_export_s: float  # reported by the source: its engine's export_kv
    source_stage_s: float  # reported by the source: writing the bytes (shm segment or socket)
    total_s: float


class TcpKVReceiver:
    """KVReceiver that moves the bytes inline on the socket. `last_timing` is the latest fetch's phases."""

    mode = "tcp"

    def __init__(self, secret: bytes, connect_timeout_s: float = 5.0, io_timeout_s: float = 30.0,
                 reuse_buffers: bool = True) -> None:
        self._secret = secret
        self._connect_timeout_s = connect_timeout_s
        self._io_timeout_s = io_timeout_s
        self._reuse = reuse_buffers  # False: fresh tensors and mappings per pull (the bench's comparison)
        self.last_timing: FetchTiming | None = None

    def fetch(self, handle: KVHandle) -> ExportedKV:
        where = f"prefill instance {handle.source_instance} at {handle.kv_url}"
        host, port = parse_kv_url(handle.kv_url)
        t0 = time.perf_counter()
        try:
            sock = socket.create_connection((host, port), timeout=self._connect_timeout_s)
        except OSError as exc:
            raise SourceUnreachableError(f"{where} unreachable: {exc}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
            sock.settimeout(self._io_timeout_s)
            wire.send_header(sock, {"op": "fetch", "mode": self.mode,
                                    "handle": encode_handle(handle, self._secret).hex()})
            t1 = time.perf_counter()
            meta = self._expect(sock, "meta")
            t2 = time.perf_counter()
            lease = self._take_buffers(meta)
            try:
                self._receive_shards(sock, [lease.shards[r] for r in sorted(lease.shards)])
                end = self._expect(sock, "end")
            except BaseException:
                lease.give_back()  # nobody holds these bytes: the next pull may have them
                raise
            t3 = time.perf_counter()
            wire.send_header(sock, {"op": "ack"})
            try:
                self._expect(sock, "released")
            except (OSError, ValueError) as exc:  # we hold the bytes; the source frees on its own expiry
                log.warning("no release confirmation from %s for %s: %s", where, handle.request_id, exc)
            t4 = time.perf_counter()
            self.last_timing = FetchTiming(t1 - t0, t2 - t1, t3 - t2, t4 - t3, float(end.get("export_s", 0.0)),
                                           float(end.get("stage_s", 0.0)), t4 - t0)
            return ExportedKV(layout=KVLayout.from_dict(meta["layout"]), num_tokens=int(meta["num_tokens"]),
                              shards=lease.shards, recycle=lease.give_back)
        except KVTransferError:
            raise
        except TimeoutError:
            raise SourceUnreachableError(f"{where} unreachable: it stopped answering for "
                                         f"{self._io_timeout_s:.0f}s during the KV pull of {handle.request_id}") from None
        except (OSError, ValueError) as exc:
            raise SourceUnreachableError(f"{where} unreachable: it went away during the KV pull of "
                                         f"{handle.request_id} ({exc})") from None
        finally:
            sock.close()

    def _take_buffers(self, meta: dict) -> Lease:
        """The shards the meta announces, as views into a (reused) receive buffer."""
        specs = [ShardSpec(int(s["rank"]), tuple(int(d) for d in s["shape"]), wire.dtype_of(str(s["dtype"])))
                 for s in meta["shards"]]
        if len({s.rank for s in specs}) != len(specs) or any(d < 0 for s in specs for d in s.shape):
            raise ValueError("KV protocol error: duplicate ranks or negative sizes in the shard list")
        return RECEIVE_BUFFERS.take(specs, reuse=self._reuse)

    def _expect(self, sock: socket.socket, op: str) -> dict:
        msg = wire.recv_header(sock)
        if msg["op"] == "error":
            raise error_from_wire(msg.get("kind"), str(msg.get("message")))
        if msg["op"] != op:
            raise KVTransferError(f"KV protocol error: expected {op!r}, got {msg['op']!r}")
        return msg

    def _receive_shards(self, sock: socket.socket, shards: list[torch.Tensor]) -> None:
        for t in shards:
            for layer in range(t.shape[0]):
                wire.recv_exact_into(sock, wire.byte_view(t[layer]))
