"""GET /v1/models and GET /v1/models/{id}: the one model this deployment serves."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from router.deps import get_settings
from router.errors import ModelNotFound
from router.schemas import ModelCard, ModelList
from router.settings import RouterSettings

router = APIRouter()


@router.get("/v1/models")
async def list_models(settings: RouterSettings = Depends(get_settings)) -> ModelList:
    return ModelList(data=[model_card(settings)])


@router.get("/v1/models/{model_id:path}", responses={404: {"description": "unknown model (OpenAI error body)"}})
async def retrieve_model(model_id: str, settings: RouterSettings = Depends(get_settings)) -> ModelCard:
    """`client.models.retrieve(id)`: the card of the served model (ids may contain '/', as Hugging Face's)."""
    if model_id != settings.served_model_name:
        raise ModelNotFound(f"model {model_id!r} is not served here; available: {settings.served_model_name!r}",
                            param="model")
    return model_card(settings)


def model_card(settings: RouterSettings) -> ModelCard:
    """The served model, with the token limits requests are checked against (a benchmark sizes to them)."""
    return ModelCard(id=settings.served_model_name, created=0, max_model_len=settings.max_seq_len,
                     max_input_len=settings.max_input_len)
