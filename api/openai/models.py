"""GET /v1/models and /v1/models/{model}: the one model this service runs."""

from __future__ import annotations

from fastapi import APIRouter

from api.auth import Caller
from api.deps import ServicesDep
from api.openai.errors import ERRORS, OpenAIRoute
from api.openai.protocol import ModelCard, ModelList
from api.openai.serving import check_model, model_card

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)


@router.get("/models", response_model=ModelList, responses=ERRORS)
async def list_models(services: ServicesDep, _caller: Caller) -> ModelList:
    """The one model this service runs."""
    return ModelList(data=[model_card(services)])


@router.get("/models/{model}", response_model=ModelCard, responses=ERRORS)
async def get_model(model: str, services: ServicesDep, _caller: Caller) -> ModelCard:
    check_model(model, services)
    return model_card(services)
