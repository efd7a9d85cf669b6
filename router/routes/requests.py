"""GET /v1/requests/{id}: a request's state, per-phase timestamps, instances and event log from Redis."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from router.deps import get_records
from router.errors import NotFound
from router.records import RecordStore

router = APIRouter()


@router.get("/v1/requests/{request_id}", responses={404: {"description": "unknown or expired request"}})
async def get_request(request_id: str, records: RecordStore = Depends(get_records)) -> dict[str, Any]:
    rec = await records.get(request_id)
    if rec is None:
        raise NotFound(f"request {request_id!r} is unknown or its retention period has passed",
                       param="request_id")
    return rec.to_json()
