"""Giving back the KV of a request that ends between its prefill and its decode.

After PREFILL_DONE the prefill instance holds the request's KV until a decode instance pulls it. When the
request ends before that pull — the client hung up, the deadline passed, the decode leg was lost before
it pulled, or the first token already ended the request — nobody will pull it, and without a release the
blocks stay taken until the handle's TTL. The router sends the handle back to the prefill instance's KV
endpoint (its `kv_url` in the registry), which verifies it like a pull and frees the blocks
(trt_disagg/kv/release.py). A release that cannot be delivered is logged: the TTL stays the backstop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from trt_disagg.contract import InstanceInfo
from trt_disagg.kv.errors import KVTransferError
from trt_disagg.kv.release import ReleaseOutcome, release_remote

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfferedKV:
    """KV a prefill instance offered for this request and no decode instance is known to have pulled."""

    instance: InstanceInfo  # the prefill instance that holds it
    handle: bytes  # its context_phase_params: the authority to pull, and to release


class KVReleaser(Protocol):
    async def release(self, request_id: str, offered: OfferedKV) -> None:
        """Ask the holder to free `offered`; never raises for an unreachable or refusing holder."""
        ...


class SocketKVReleaser:
    """KVReleaser over the prefill instances' KV endpoints (the release op of the KV pull protocol)."""

    def __init__(self, *, timeout_s: float) -> None:
        self._timeout_s = timeout_s

    async def release(self, request_id: str, offered: OfferedKV) -> None:
        where = offered.instance.instance_id
        if not offered.instance.kv_url:
            log.info("KV of %s on %s not released: the instance has no KV endpoint", request_id, where)
            return
        try:
            outcome = await release_remote(offered.instance.kv_url, offered.handle, timeout_s=self._timeout_s)
        except KVTransferError as exc:
            log.warning("could not release the KV of %s on %s (its TTL frees it): %s", request_id, where, exc)
            return
        if outcome is ReleaseOutcome.RELEASED:
            log.info("released the un-pulled KV of %s on %s", request_id, where)
