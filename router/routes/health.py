"""GET /health: ready (200) only when the deployment can serve a request; 503 otherwise, with the reason."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from router.deps import get_dispatcher, get_redis
from router.dispatch import Dispatcher
from trt_disagg.contract import Role

router = APIRouter()


@router.get("/health", responses={503: {"description": "not ready"}})
async def health(dispatcher: Dispatcher = Depends(get_dispatcher), redis: Any = Depends(get_redis)) -> JSONResponse:
    snap = dispatcher.snapshot
    pools = {role.value: len(snap.live(role)) for role in Role}
    try:
        await redis.ping()
        redis_ok = True
    except Exception:
        redis_ok = False
    ready = redis_ok and dispatcher.can_serve()
    reason = None if ready else ("redis unreachable" if not redis_ok else
                                 "no healthy prefill+decode pair and no colocated instance")
    return JSONResponse({"status": "ready" if ready else "unavailable", "reason": reason, "instances": pools,
                         "redis": redis_ok}, status_code=200 if ready else 503)
