"""Giving offered KV back from afar: the router's half of the release op (asyncio, no torch).

A request can end after its prefill and before any decode instance pulled its KV (the client hung up, the
deadline passed, the router gave up). The prefill instance would hold those blocks until the handle's TTL;
instead the router sends the handle back to the instance's KV endpoint, which verifies it exactly like a
pull (signature, this instance) and frees the blocks:

    router ──{"op": "release", "handle"}──▶ prefill KV endpoint ──▶ SocketKVSender.release_handle()
           ◀──{"op": "released", "held"}──

Possessing the handle is the authority, as for a pull, so the router needs no secret. Releasing a handle
whose KV was already pulled, released or expired is a no-op (NOT_HELD); the TTL stays the backstop when
the release cannot be delivered.
"""

from __future__ import annotations

import asyncio
import enum

from trt_disagg.kv import wire
from trt_disagg.kv.errors import HandleForgedError, KVTransferError, SourceUnreachableError, WireErrorKind


class ReleaseOutcome(enum.Enum):
    RELEASED = "released"  # the source still held the KV: freed now, or when the pull in flight ends
    NOT_HELD = "not_held"  # nothing to do: already pulled, released or expired


async def release_remote(kv_url: str, handle: bytes, *, timeout_s: float = 2.0) -> ReleaseOutcome:
    """Ask the prefill instance at `kv_url` to free the KV that `handle` names.

    Raises HandleForgedError when the instance refuses the handle, SourceUnreachableError when it cannot
    be reached or does not answer within `timeout_s`, KVTransferError on any other protocol error."""
    host, port = wire.parse_kv_url(kv_url)
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(wire.encode_header({"op": "release", "handle": bytes(handle).hex()}))
                await writer.drain()
                reply = await wire.read_header(reader)
            finally:
                writer.close()
    except TimeoutError:
        raise SourceUnreachableError(f"KV endpoint {kv_url} did not answer a release within {timeout_s}s") from None
    except (OSError, ValueError) as exc:
        raise SourceUnreachableError(f"KV endpoint {kv_url} unreachable for a release: {exc}") from None
    if reply["op"] == "released":
        return ReleaseOutcome.RELEASED if reply.get("held") else ReleaseOutcome.NOT_HELD
    if reply["op"] == "error" and reply.get("kind") == WireErrorKind.FORGED:
        raise HandleForgedError(str(reply.get("message")))
    raise KVTransferError(f"KV endpoint {kv_url} answered a release with {reply}")
