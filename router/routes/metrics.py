"""GET /metrics: this router's Prometheus registry in the text exposition format."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST

from router.deps import get_metrics
from router.metrics import RouterMetrics

router = APIRouter()


@router.get("/metrics")
async def metrics(m: RouterMetrics = Depends(get_metrics)) -> Response:
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)
