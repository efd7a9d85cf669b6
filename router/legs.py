"""What one request holds on the instances, by role, and the rule that gives it back.

    open[role]        the instance of the request's current leg of that role (a call may be open there)
    unpulled          prefill KV offered for the request that no decode leg has pulled yet
    call_id(role)     the request id the next call of that role gives its instance
    abandon(role, e)  give up the leg now with error `e`: its instance stopped beating, or the router is
                      stopping. The leg's current wait (`waiting[role]`, the timeout of the call or of the
                      wait for its next token) fires at once; a leg between waits finds `abandoned` first.

Ownership: from `offer()` the prefill instance holds KV on the request's behalf until a decode leg streams
from it (`pulled()`). A decode leg lost before its first token gives it back at once (`lost()`), and so
does the request's end (`close()`): cancel, deadline, failure, or a first token that already ends the
request. Without that the blocks stay taken until the handle's TTL (kv_release.py). `close()` also
cancels the calls still open when the request did not complete normally.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from router.instance_client import InstanceClient
from router.kv_release import KVReleaser, OfferedKV
from trt_disagg.contract import InstanceInfo, Role

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class Legs:
    def __init__(self, request_id: str, client: InstanceClient, releaser: KVReleaser, spawn: Spawn) -> None:
        self._request_id = request_id
        self._client = client
        self._releaser = releaser
        self._spawn = spawn
        self.open: dict[Role, InstanceInfo] = {}
        self.unpulled: OfferedKV | None = None
        self.waiting: dict[Role, asyncio.Timeout] = {}
        self.abandoned: dict[Role, Exception] = {}
        self._calls: dict[Role, int] = {}

    def call_id(self, role: Role) -> str:
        """The request's own id for its first call of `role`, then `<id>-<role initial><n>`. A retry or a
        continuation can land on an instance where an earlier call of this request is still being cleaned
        up (a prefill whose KV pull failed mid-way is freed only when the failure reaches the prefill
        side), and an engine refuses an id it still holds. Cancelling the request's id cancels them all
        (instance_client.TritonInstanceClient.cancel)."""
        n = self._calls.get(role, 0)
        self._calls[role] = n + 1
        return self._request_id if n == 0 else f"{self._request_id}-{role.value[0]}{n}"

    def on(self, instance_id: str) -> list[Role]:
        """The roles whose current leg runs on `instance_id`."""
        return [role for role, inst in self.open.items() if inst.instance_id == instance_id]

    def abandon(self, role: Role, error: Exception) -> None:
        self.abandoned[role] = error
        wait = self.waiting.get(role)
        if wait is not None:
            try:
                wait.reschedule(asyncio.get_running_loop().time())
            except RuntimeError:  # that wait is over: the leg finds `abandoned` before its next one
                pass

    def offer(self, prefill: InstanceInfo, handle: bytes) -> None:
        """`prefill` now holds the request's KV until a decode leg pulls it."""
        self.unpulled = OfferedKV(prefill, handle)

    def pulled(self) -> None:
        """A decode leg streams from the KV: the decode instance holds it now."""
        self.unpulled = None

    async def lost(self, role: Role) -> None:
        """The leg of `role` failed; a decode leg lost before its first token leaves its KV on the prefill
        side, which is given back now (the continuation re-prefills)."""
        self.open.pop(role, None)
        self.abandoned.pop(role, None)
        if role is Role.DECODE:
            await self._release_unpulled()

    async def close(self, *, cancel_calls: bool) -> None:
        """The request ended: cancel its open calls (unless it completed) and give back un-pulled KV in a
        task of its own (the end does not wait for the prefill instance)."""
        if cancel_calls:
            for instance in self.open.values():
                await self._client.cancel(instance, self._request_id)
        offered, self.unpulled = self.unpulled, None
        if offered is not None:
            self._spawn(self._releaser.release(self._request_id, offered))

    async def _release_unpulled(self) -> None:
        offered, self.unpulled = self.unpulled, None
        if offered is not None:
            await self._releaser.release(self._request_id, offered)
