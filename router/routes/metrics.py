"""GET /metrics: this router's Prometheus registry in the text exposition format."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST

from router.deps import RouterState, get_state

router = APIRouter()


@router.get("/metrics")
async def metrics(state: RouterState = Depends(get_state)) -> Response:
    state.metrics.observe_accept_queue(state.accept_queue)
    if state.runner is not None:
        state.metrics.observe_admission(state.runner.admission)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
