"""Live configuration for admins: show, set, history, rollback (host/config_store.py).
What `localmoe config` calls. A change reaches every process within a few seconds."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.auth import Admin
from api.deps import Services, ServicesDep
from api.protocol import refusals
from host import config_store
from host.config_store import ConfigError, Version

router = APIRouter(prefix="/v1/config", tags=["config"], responses=refusals(401, 403))


class ConfigView(BaseModel):
    version: Version
    effective: dict[str, Any] = Field(description="The hot sections as this API process runs them.")
    hot: list[str] = Field(description="What may change without a restart.")
    restart_only: list[str] = Field(description="Changed now, used when a worker next starts.")


class ConfigChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    set: dict[str, Any] = Field(description='Dotted paths: {"limits.max_queued_jobs": 500}; null removes.')
    note: str | None = Field(None, max_length=500)

    @field_validator("set")
    @classmethod
    def _storable(cls, values: dict[str, Any]) -> dict[str, Any]:
        # Kept as JSON and echoed back: a lone surrogate could not be encoded (a 500), and
        # NaN / Infinity would be stored as null (the override silently removed elsewhere).
        json.dumps(values, allow_nan=False, ensure_ascii=False).encode()
        return values


class Rollback(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=0, description="0: back to the settings the service started with.")


def _view(services: Services, version: Version) -> ConfigView:
    s = services.settings
    effective = {name: getattr(s, name).model_dump(mode="json") for name in config_store.HOT_SECTIONS}
    for section, hot in config_store.HOT_KEYS.items():
        effective[section] = {k: getattr(getattr(s, section), k) for k in hot}
    return ConfigView(
        version=version,
        effective=effective,
        hot=[
            *config_store.HOT_SECTIONS,
            *(f"{section}.{k}" for section, hot in config_store.HOT_KEYS.items() for k in hot),
        ],
        restart_only=sorted(config_store.RESTART_ONLY),
    )


async def _run(services: Services, fn: Any, *args: Any) -> Version:
    try:
        version: Version = await asyncio.to_thread(
            fn, services.enqueuer.client, services.base_settings, *args
        )
    except ConfigError as e:
        raise HTTPException(422, str(e)) from e
    await asyncio.to_thread(services.config_watcher.check)  # this process applies it at once
    return version


@router.get("", response_model=ConfigView)
async def show(services: ServicesDep, _admin: Admin) -> ConfigView:
    version = await asyncio.to_thread(config_store.current, services.enqueuer.client)
    return _view(services, version)


@router.patch("", response_model=ConfigView, responses=refusals(413, 422))
async def change(body: ConfigChange, services: ServicesDep, admin: Admin) -> ConfigView:
    """A new version with these values; refused (422, with the reason) when a value does not
    validate or the setting is not hot."""
    version = await _run(services, config_store.set_values, body.set, f"{admin.name} ({admin.id})", body.note)
    return _view(services, version)


@router.get("/history", response_model=list[Version])
async def history(services: ServicesDep, _admin: Admin) -> list[Version]:
    return await asyncio.to_thread(config_store.history, services.enqueuer.client)


@router.post("/rollback", response_model=ConfigView, responses=refusals(413, 422))
async def rollback(body: Rollback, services: ServicesDep, admin: Admin) -> ConfigView:
    version = await _run(services, config_store.rollback, body.version, f"{admin.name} ({admin.id})")
    return _view(services, version)
