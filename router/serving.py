"""uvicorn with a graceful drain: what `python -m router` runs.

    first SIGTERM / SIGINT:  stop admitting (503 shutting_down) → requests in flight finish, for at most
                             drain_timeout_s → the rest end with a shutting_down error (a stream gets an SSE
                             error event and [DONE], never a silent cut) and their records say why → uvicorn
                             stops as usual (lifespan shutdown, connections closed)
    a second signal:         uvicorn's own handling (SIGINT twice: stop now)

uvicorn alone would close the connections of streams still running when its short graceful timeout ends,
and only then run the app's lifespan shutdown: too late for the app to end those streams cleanly.
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signalled = False
        self.drain: asyncio.Task[list[str]] | None = None  # its result: the requests the drain cut short

    async def startup(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        # what new connections wait in before the app sees them counts in their TTFT (router/accept_queue.py)
        self._app.state.router.accept_queue.listen_on(s for server in self.servers for s in server.sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled or self._app.state.router.runner is None or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._signalled = True
        # a signal handler runs between two bytecodes of the loop's thread: hand the drain to the loop
        self._loop.call_soon_threadsafe(self._start_drain, sig, frame)

    def _start_drain(self, sig: int, frame: FrameType | None) -> None:
        self.drain = asyncio.ensure_future(self._drain(sig, frame))

    async def _drain(self, sig: int, frame: FrameType | None) -> list[str]:
        settings = self._app.state.router.settings
        log.info("draining: no new requests; %.0fs for the ones in flight", settings.drain_timeout_s)
        try:
            cut = await self._app.state.router.runner.requests.drain(settings.drain_timeout_s)
            if cut:
                log.warning("drain ended %d request(s) still running: %s", len(cut), ", ".join(cut))
            return cut
        finally:
            super().handle_exit(sig, frame)
