"""GET /v1/models: the one model this deployment serves."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from router.deps import get_settings
from router.schemas import ModelCard, ModelList
from router.settings import RouterSettings

router = APIRouter()


@router.get("/v1/models")
async def list_models(settings: RouterSettings = Depends(get_settings)) -> ModelList:
    return ModelList(data=[ModelCard(id=settings.served_model_name, created=0)])
