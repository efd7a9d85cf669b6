"""The KV transfer seam: who owns the blocks when, and the registry that picks a transport by name.

Ownership (the rule that keeps KV from leaking, after vLLM's connector and SGLang's sender/receiver):

    prefill engine ──PREFILL_DONE──▶ KVSender.offer(): the sender owns the blocks (engine keeps them)
        │                              expires after handle_ttl_s ──▶ release (engine frees)
        ▼
    decode: KVReceiver.fetch(handle) pulls the bytes, ACKs ──▶ sender releases (engine frees)
            the receiver's copy is the decode engine's to import (add_decode_request); once written into
            its pool, ExportedKV.consumed() gives the memory back to the receiver (kv/buffers.py)

`release()` is idempotent and is the only way blocks go back: after an ACK, on expiry, on cancel, on
shutdown, and on the router's release op (`release_handle`, kv/release.py: a request given up between its
prefill and its decode). Un-pulled KV counts against new admissions (`can_admit`, CacheTransceiverConfig.max_pending_tokens).

Transports: "tcp" (any host), "shm" (same host; bytes through a /dev/shm segment, control over TCP),
"fake" (in-process, the test double), "auto" (shm when the handle's source is on this host, else tcp).
Callers above kv/ use `make_sender` / `make_receiver` and never import a transport module.
"""

from __future__ import annotations

import functools
import importlib
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from trt_disagg.contract import KVLayout
from trt_disagg.exported_kv import ExportedKV
from trt_disagg.kv.errors import KVTransferError, LayoutMismatchError
from trt_disagg.kv.handle import KVHandle


class KVSource(Protocol):
    """What a sender needs from the prefill engine (LLMEngine has these; the adapter serialises calls)."""

    def export_kv(self, request_id: str) -> ExportedKV: ...
    def release_kv(self, request_id: str) -> None: ...


class KVSender(Protocol):
    """Prefill side. Owns offered KV until it is pulled, expires, or is released."""

    @property
    def url(self) -> str: ...
    def start(self) -> None: ...
    def can_admit(self, num_tokens: int) -> bool: ...
    def offer(self, request_id: str, num_tokens: int, first_token: int,
              block_ids: tuple[int, ...] = ()) -> KVHandle: ...
    def release(self, request_id: str) -> None: ...
    def release_handle(self, blob: bytes) -> bool: ...  # the router's release op; verified like a pull
    def pending_tokens(self) -> int: ...
    def num_pending(self) -> int: ...
    def close(self) -> None: ...


class KVReceiver(Protocol):
    """Decode side. Blocking: the adapter calls it from a worker thread, never the scheduler loop."""

    def fetch(self, handle: KVHandle) -> ExportedKV: ...


@functools.cache
def local_host_id() -> str:
    """This machine's identity: equal ids mean a /dev/shm segment is reachable by both processes."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class HandleIssuer(Protocol):
    """What `issue_handle` reads off a sender."""

    instance_id: str
    layout: KVLayout
    handle_ttl_s: float

    @property
    def url(self) -> str: ...


def issue_handle(sender: HandleIssuer, request_id: str, num_tokens: int, first_token: int,
                 block_ids: tuple[int, ...] = ()) -> KVHandle:
    """The handle `sender.offer` gives out: names the sender and this host, valid `handle_ttl_s` from now."""
    return KVHandle(request_id=request_id, source_instance=sender.instance_id, kv_url=sender.url,
                    source_host=local_host_id(), layout=sender.layout, num_tokens=num_tokens,
                    first_token=first_token, expires_at=time.time() + sender.handle_ttl_s,
                    block_ids=tuple(block_ids))


def check_layout(handle: KVHandle, local: KVLayout) -> None:
    why = handle.layout.compatible_with(local)
    if why is not None:
        raise LayoutMismatchError(f"KV of request {handle.request_id} from instance {handle.source_instance} "
                                  f"cannot be used here: {why}")


# name -> "module:Class"; adding a transport is one file and one line.
RECEIVERS: dict[str, str] = {
    "tcp": "trt_disagg.kv.tcp:TcpKVReceiver",
    "shm": "trt_disagg.kv.shm:ShmKVReceiver",
    "fake": "trt_disagg.kv.fake:FakeKVReceiver",
}
SENDERS: dict[str, str] = {
    "socket": "trt_disagg.kv.sender:SocketKVSender",  # serves tcp and shm pulls
    "fake": "trt_disagg.kv.fake:FakeKVSender",
}
CPU_BACKENDS = ("auto", "shm", "tcp", "fake")


def _load(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def make_sender(backend: str, **kwargs) -> KVSender:
    """The sender for a CacheTransceiverConfig.backend (auto/shm/tcp all use the socket server)."""
    if backend not in CPU_BACKENDS:
        raise KVTransferError(f"cache_transceiver_config.backend {backend!r} is not a CPU transport "
                              f"(one of {', '.join(CPU_BACKENDS)})")
    return _load(SENDERS["fake" if backend == "fake" else "socket"])(**kwargs)  # type: ignore[no-any-return]


def resolve_receiver_name(backend: str, handle: KVHandle) -> str:
    """auto -> shm when the source shares this host, else tcp; shm across hosts is an error."""
    same_host = handle.source_host == local_host_id()
    if backend == "auto":
        return "shm" if same_host else "tcp"
    if backend == "shm" and not same_host:
        raise KVTransferError(f"transport shm needs the prefill instance {handle.source_instance} on this host "
                              f"(it is on {handle.source_host}); use backend tcp or auto")
    if backend not in RECEIVERS:
        raise KVTransferError(f"unknown KV transport {backend!r} (one of {', '.join(RECEIVERS)}, auto)")
    return backend


def drop_receive_caches() -> None:
    """Free what pulls keep for the next one in this process: idle receive buffers (kv/buffers.py) and kept
    mappings of peers' shm segments (kv/shm.py). A decode instance calls it when it stops; pulls still in
    flight keep theirs until they end."""
    from trt_disagg.kv.buffers import RECEIVE_BUFFERS
    from trt_disagg.kv.shm import SEGMENT_MAPS

    RECEIVE_BUFFERS.clear()
    SEGMENT_MAPS.clear()


def make_receiver(name: str, **kwargs) -> KVReceiver:
    if name not in RECEIVERS:
        raise KVTransferError(f"unknown KV transport {name!r} (one of {', '.join(RECEIVERS)})")
    return _load(RECEIVERS[name])(**kwargs)  # type: ignore[no-any-return]
