"""When a request reached the router, stamped before anything else runs for it.

Under overload the router's own event loop is a queue: a request may wait for the loop, for its body to be
read and for its prompt to be tokenized before admission looks at it. A client's time to first token counts
that wait, so admission must count it too (router/admission.py) and the job's clock starts here, not at
admission. A request on a new connection waited before this point too, in the kernel's accept queue: the
stamp is moved back by that wait as router/accept_queue.py estimates it. The stamp lives in the ASGI
scope's `state`, which Starlette exposes as `request.state`.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from router.accept_queue import AcceptQueue

RECEIVED_S = "trtd_received_s"  # monotonic seconds


class StampReceived:
    """The outermost middleware: stamps every HTTP request with `time.monotonic()` as it arrives, less the
    wait of its connection in the accept queue (0 while no listening socket is attached to `accept_queue`)."""

    def __init__(self, app: ASGIApp, accept_queue: AcceptQueue) -> None:
        self._app = app
        self._accept_queue = accept_queue

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            client = scope.get("client")
            waited_s = self._accept_queue.wait_s(tuple(client) if client else None)
            scope.setdefault("state", {})[RECEIVED_S] = time.monotonic() - waited_s
        await self._app(scope, receive, send)


def received_s(request: Request) -> float:
    """The request's arrival stamp; now for a request that came in without the middleware (unit tests)."""
    return float(getattr(request.state, RECEIVED_S, time.monotonic()))
