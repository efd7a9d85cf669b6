"""Framing of the KV pull protocol: a 4-byte length, a JSON header, and (for tensors) raw bytes.

    decode -> prefill   {"op": "fetch", "handle": <hex>, "mode": "tcp" | "shm"}
    prefill -> decode   {"op": "meta", "num_tokens", "layout", "shards": [{"rank", "shape", "dtype"}]}
                        tcp: the raw bytes of every shard, layer by layer (rank order), no framing between
                        shm: {"op": "shm", "name", "offsets"} (the bytes lie in a /dev/shm segment),
                             then {"op": "ready", "upto": k} as layers are written (the receiver copies out layers < k)
                        {"op": "end"}
    decode -> prefill   {"op": "ack"}            the prefill side then frees the blocks
    prefill -> decode   {"op": "released"}       so fetch() returns only once the source is free
    any error           {"op": "error", "kind": errors.WireErrorKind ("forged" | "expired" | "not_found" |
                                                  "internal"), "message"}

A router that gives a request up before a decode instance pulled its KV (cancel, deadline, failure):

    router -> prefill   {"op": "release", "handle": <hex>}   verified like a fetch (HMAC, this instance)
    prefill -> router   {"op": "released", "held": bool}     held: the KV was still offered and goes back now
                                                             (or when a pull in flight ends); false: nothing
                                                             to do (already pulled, released or expired)

A TCP pull therefore costs PULL_ROUND_TRIPS round trips on top of its bytes (connect, fetch -> meta, the
last bytes -> ack, ack -> released): what a link model adds per hand-off (the simulator's `handoff_s`).

Never pickle: the peer is on the network. Tensors travel as raw little-endian bytes of a known shape/dtype.
torch is imported only where tensors are touched, so the router can speak the release op without it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from trt_disagg.kv.errors import KVTransferError

PULL_ROUND_TRIPS = 4

if TYPE_CHECKING:
    import torch

_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 1 << 20


def parse_kv_url(url: str) -> tuple[str, int]:
    """(host, port) of a KV endpoint "tcp://host:port"."""
    parts = urlsplit(url)
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
        raise KVTransferError(f"bad KV endpoint {url!r}: expected tcp://host:port")
    return parts.hostname, parts.port


class PeerClosed(ConnectionError):
    """The other side closed the connection in the middle of a frame."""


def encode_header(header: dict) -> bytes:
    data = json.dumps(header, separators=(",", ":")).encode()
    return _LEN.pack(len(data)) + data


def send_header(sock: socket.socket, header: dict) -> None:
    sock.sendall(encode_header(header))


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` completely from the socket (recv_into: no intermediate copies)."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise PeerClosed(f"connection closed after {got} of {n} bytes")
        got += k


def recv_header(sock: socket.socket) -> dict:
    raw = bytearray(_LEN.size)
    recv_exact_into(sock, memoryview(raw))
    (n,) = _LEN.unpack(raw)
    if n > MAX_HEADER_BYTES:
        raise ValueError(f"KV protocol header of {n} bytes is too large")
    body = bytearray(n)
    recv_exact_into(sock, memoryview(body))
    return _parse(body)


async def read_header(reader: asyncio.StreamReader) -> dict:
    """`recv_header` for asyncio streams (the router's side of the release op)."""
    try:
        (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"KV protocol header of {n} bytes is too large")
        return _parse(await reader.readexactly(n))
    except asyncio.IncompleteReadError as exc:
        raise PeerClosed(f"connection closed after {len(exc.partial)} bytes of a frame") from None


def _parse(body: bytes | bytearray) -> dict:
    header = json.loads(body)
    if not isinstance(header, dict) or "op" not in header:
        raise ValueError("KV protocol header without 'op'")
    return header


def byte_view(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous tensor, any dtype (bfloat16 included), without a copy."""
    import torch

    flat = t.contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())  # type: ignore[arg-type]


def dtype_of(name: str) -> torch.dtype:
    import torch

    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r} in KV stream")
    return dt


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")
