"""In-process KV transport: the test double that ships with the real ones (same Protocols, same rules).

Senders register in a `FakeFabric` by instance id; a receiver looks the source up there instead of
connecting. Expiry, backpressure, verification and release-on-pull behave as in the socket sender, so
code above kv/ can be tested without sockets. `fabric.down(instance_id)` simulates a crashed source.
"""

from __future__ import annotations

import threading

from trt_disagg.contract import KVLayout
from trt_disagg.exported_kv import ExportedKV
from trt_disagg.kv.errors import InvalidHandleError, KVNotFoundError, SourceUnreachableError
from trt_disagg.kv.handle import KVHandle, decode_handle, encode_handle, verify_handle
from trt_disagg.kv.transport import KVSource, issue_handle


class FakeFabric:
    """Where fake senders are reachable; one per test (DEFAULT_FABRIC when none is given)."""

    def __init__(self) -> None:
        self.senders: dict[str, FakeKVSender] = {}
        self._down: set[str] = set()

    def down(self, instance_id: str) -> None:
        self._down.add(instance_id)

    def lookup(self, instance_id: str) -> FakeKVSender | None:
        return None if instance_id in self._down else self.senders.get(instance_id)


DEFAULT_FABRIC = FakeFabric()


class FakeKVSender:
    def __init__(self, source: KVSource, secret: bytes, instance_id: str, layout: KVLayout,
                 handle_ttl_s: float = 60.0, max_pending_tokens: int | None = None,
                 fabric: FakeFabric | None = None, **_socket_options: object) -> None:
        self._source = source
        self._secret = secret
        self.instance_id = instance_id
        self.layout = layout
        self.handle_ttl_s = handle_ttl_s
        self.max_pending_tokens = max_pending_tokens
        self._fabric = fabric or DEFAULT_FABRIC
        self._offers: dict[str, KVHandle] = {}
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"fake://{self.instance_id}"

    def start(self) -> None:
        self._fabric.senders[self.instance_id] = self

    def close(self) -> None:
        self._fabric.senders.pop(self.instance_id, None)
        for rid in list(self._offers):
            self.release(rid)

    def can_admit(self, num_tokens: int) -> bool:
        return self.max_pending_tokens is None or self.pending_tokens() + num_tokens <= self.max_pending_tokens

    def offer(self, request_id: str, num_tokens: int, first_token: int,
              block_ids: tuple[int, ...] = ()) -> KVHandle:
        handle = issue_handle(self, request_id, num_tokens, first_token, block_ids)
        with self._lock:
            self._offers[request_id] = handle
        return handle

    def release(self, request_id: str) -> None:
        with self._lock:
            held = self._offers.pop(request_id, None)
        if held is not None:
            self._source.release_kv(request_id)

    def release_handle(self, blob: bytes) -> bool:
        """The release op, as SocketKVSender has it (a fake pull is atomic, so no pull is ever in flight)."""
        handle = verify_handle(blob, self._secret)
        if handle.source_instance != self.instance_id:
            raise InvalidHandleError(f"handle names instance {handle.source_instance}, this is {self.instance_id}")
        with self._lock:
            if self._offers.get(handle.request_id) != handle:
                return False
        self.release(handle.request_id)
        return True

    def pending_tokens(self) -> int:
        with self._lock:
            return sum(h.num_tokens for h in self._offers.values())

    def num_pending(self) -> int:
        with self._lock:
            return len(self._offers)

    def reap_expired(self, now: float | None = None) -> list[str]:
        with self._lock:
            gone = [rid for rid, h in self._offers.items() if h.expired(now)]
        for rid in gone:
            self.release(rid)
        return gone

    def serve(self, blob: bytes) -> ExportedKV:
        handle = decode_handle(blob, self._secret)
        with self._lock:
            if handle.request_id not in self._offers:
                raise KVNotFoundError(f"request {handle.request_id} is not held by {self.instance_id}")
        kv = self._source.export_kv(handle.request_id)
        kv = ExportedKV(layout=kv.layout, num_tokens=kv.num_tokens,
                        shards={r: t.clone() for r, t in kv.shards.items()})
        self.release(handle.request_id)  # the clone is the "ACKed copy"
        return kv


class FakeKVReceiver:
    def __init__(self, secret: bytes, fabric: FakeFabric | None = None, **_socket_options: object) -> None:
        self._secret = secret
        self._fabric = fabric or DEFAULT_FABRIC

    def fetch(self, handle: KVHandle) -> ExportedKV:
        sender = self._fabric.lookup(handle.source_instance)
        if sender is None:
            raise SourceUnreachableError(f"prefill instance {handle.source_instance} at {handle.kv_url} "
                                         "unreachable: not in the fake fabric")
        return sender.serve(encode_handle(handle, self._secret))
