"""One error hierarchy for the router, each class with its HTTP status and an OpenAI-shaped body.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

Handlers are installed by `install_handlers(app)`: one for `RouterError` (every subclass carries its own
status), one for request validation (messages built from `exc.errors()`: field path + pydantic's message,
never a file path or a traceback), one for Starlette's HTTP errors (unknown route, wrong method) and a
last-resort one that logs and answers 500 without leaking internals. After a stream has started the status
line is gone; `streaming.py` sends the same body as a final SSE chunk instead.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class RouterError(Exception):
    """Base: `status` is the HTTP status, `type`/`code` go into the OpenAI error body."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(RouterError):
    status = 400
    type = "invalid_request_error"


class PromptTooLong(BadRequest):
    code = "context_length_exceeded"


class ModelNotFound(RouterError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(RouterError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Unauthorized(RouterError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Overloaded(RouterError):
    """Queues are full: the client should come back after `retry_after_s`."""

    status = 429
    type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        # Retry-After takes whole seconds (at least 1); `retry-after-ms` (which the openai clients read first)
        # carries the estimate itself, which is often well under a second when the queue hovers at its target
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s))),
                "retry-after-ms": str(max(1, round(1000 * self.retry_after_s)))}


class InstanceUnavailable(RouterError):
    """No healthy instance can take the request (none registered, all drained, all failed)."""

    status = 503
    type = "service_unavailable"
    code = "instance_unavailable"


class ShuttingDown(InstanceUnavailable):
    """The router is stopping: it admits nothing new, and what it could not finish in time ends with this."""

    code = "shutting_down"


class InstanceFailed(RouterError):
    """An instance answered with an error the router could not route around."""

    status = 502
    type = "server_error"
    code = "instance_failed"


class KVTransferFailed(InstanceFailed):
    """The KV hand-off failed on every decode leg tried (the pull failed, or the handle was refused)."""

    code = "kv_transfer_failed"


class DeadlineExceeded(RouterError):
    status = 504
    type = "timeout_error"
    code = "deadline_exceeded"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """One line per problem, `field.path: message`; the first problem's path is the `param`."""
    parts: list[str] = []
    first_param: str | None = None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body" and not _is_union_branch(p)]
        path = ".".join(loc)
        if err.get("type") == "json_invalid":
            parts.append("request body is not valid JSON")
            continue
        if first_param is None and path:
            first_param = path
        parts.append(f"{path}: {err.get('msg', 'invalid value')}" if path else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request", first_param


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "bytes"})


def _is_union_branch(part: object) -> bool:
    """pydantic names the member of a union a value failed as a location part (`stop.constrained-str`,
    `prompt.list[int]`): that is the type tried, not a field the client sent, so it stays out of `param`.
    The API's field names are snake_case and never contain '-' or '['."""
    return isinstance(part, str) and ("-" in part or "[" in part or part in _TYPE_TAGS)


def install_handlers(app: FastAPI) -> None:
    """Route every error to an OpenAI-shaped JSON body; a 500 only for a real bug."""

    @app.exception_handler(RouterError)
    async def _router_error(_: Request, exc: RouterError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind, None, None), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in the router")
        return JSONResponse(error_body("internal error", "server_error"), status_code=500)
