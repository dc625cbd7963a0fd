"""Key management for admins: what `localmoe keys create | list | revoke` calls."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path
from pydantic import BaseModel, ConfigDict, Field

from api.auth import Admin, ApiKey, KeyLimits, NewKey, Scope
from api.deps import ServicesDep
from api.protocol import refusals

router = APIRouter(prefix="/v1/keys", tags=["keys"], responses=refusals(401, 403))


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, description="Who or what uses the key.")
    scope: Scope = Scope.USER
    limits: KeyLimits = Field(default_factory=KeyLimits)


@router.post("", status_code=201, response_model=NewKey, responses=refusals(413))
async def create(body: KeyRequest, services: ServicesDep, _admin: Admin) -> NewKey:
    """A new key; `secret` is shown in this answer only (Redis keeps its SHA-256)."""
    return await services.keys.create(body.name, body.scope, body.limits)


@router.get("", response_model=list[ApiKey])
async def list_keys(services: ServicesDep, _admin: Admin) -> list[ApiKey]:
    return await services.keys.list()


@router.delete("/{key_id}", response_model=ApiKey, responses=refusals(404, 409))
async def revoke(
    services: ServicesDep, admin: Admin, key_id: Annotated[str, Path(pattern=r"^[0-9a-f]{12}$")]
) -> ApiKey:
    """Revoked keys stop working within a second; the record stays, marked."""
    if key_id == admin.id:
        raise HTTPException(409, "an admin key cannot revoke itself; use another admin key")
    revoked = await services.keys.revoke(key_id)
    if revoked is None:
        raise HTTPException(404, f"no key {key_id!r}")
    return revoked
