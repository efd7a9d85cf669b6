"""When the router first saw a request, stamped before anything else runs for it.

Under overload the router's own event loop is a queue: a request may wait for the loop, for its body to be
read and for its prompt to be tokenized before admission looks at it. A client's time to first token counts
that wait, so admission must count it too (router/admission.py) and the job's clock starts here, not at
admission. The stamp lives in the ASGI scope's `state`, which Starlette exposes as `request.state`.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

RECEIVED_S = "trtd_received_s"  # monotonic seconds


class StampReceived:
    """The outermost middleware: stamps `time.monotonic()` on every HTTP request as it arrives."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})[RECEIVED_S] = time.monotonic()
        await self._app(scope, receive, send)


def received_s(request: Request) -> float:
    """The request's arrival stamp; now for a request that came in without the middleware (unit tests)."""
    return float(getattr(request.state, RECEIVED_S, time.monotonic()))
