"""What routes get through `Depends`: the app's settings and the objects its lifespan opened.

Everything lives on `app.state.router` (a `RouterState` built by `app.create_app`); nothing is a module
global, so two apps in one process (two routers in a test) are independent. Tests override any of these
with `app.dependency_overrides`.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from router.accept_queue import AcceptQueue
from router.dispatch import Dispatcher
from router.errors import Unauthorized
from router.instance_client import InstanceClient
from router.metrics import RouterMetrics
from router.pipeline import RequestRunner
from router.records import RecordStore
from router.settings import RouterSettings
from router.tokenizer import TextTokenizer

T = TypeVar("T")


@dataclass
class RouterState:
    """The app's long-lived objects; the lifespan fills the optional ones."""

    settings: RouterSettings
    metrics: RouterMetrics
    tokenizer: TextTokenizer | None = None
    accept_queue: AcceptQueue = field(default_factory=AcceptQueue)  # the server attaches its sockets
    client: InstanceClient | None = None
    redis: Any = None
    records: RecordStore | None = None
    dispatcher: Dispatcher | None = None
    runner: RequestRunner | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  # set when the lifespan begins to stop

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `coro` in a task the lifespan keeps (and cancels at shutdown)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


def get_state(request: Request) -> RouterState:
    return request.app.state.router


# The dependencies below are `async def` although they do not await: FastAPI runs a plain `def` dependency
# in its thread pool, a thread hand-off per dependency per request that showed in the router's latency.


async def get_settings(request: Request) -> RouterSettings:
    return get_state(request).settings


def _started(value: T | None) -> T:
    """What the lifespan opens is None until it has run."""
    assert value is not None, "lifespan not started"
    return value


async def get_runner(request: Request) -> RequestRunner:
    return _started(get_state(request).runner)


async def get_records(request: Request) -> RecordStore:
    return _started(get_state(request).records)


async def get_dispatcher(request: Request) -> Dispatcher:
    return _started(get_state(request).dispatcher)


async def get_tokenizer(request: Request) -> TextTokenizer:
    return _started(get_state(request).tokenizer)


async def get_redis(request: Request) -> Any:
    return get_state(request).redis


_bearer = HTTPBearer(auto_error=False)


async def require_admin(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
                        settings: RouterSettings = Depends(get_settings)) -> None:
    """Admin routes need `Authorization: Bearer <admin_token>`; with no token configured they are off."""
    if settings.admin_token is None:
        raise Unauthorized("admin endpoints are disabled (no admin_token configured)")
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), settings.admin_token.get_secret_value().encode()):
        raise Unauthorized("missing or wrong bearer token")
