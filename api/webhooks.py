"""Webhook endpoints: a key registers the URLs its jobs may call back, and gets each one's
signing secret (Standard Webhooks: `whsec_…`). A job names a registered URL in `webhook.url`."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path
from pydantic import BaseModel, ConfigDict, Field

from api.auth import ApiKey, Caller
from api.deps import Services, ServicesDep
from api.protocol import refusals
from scheduler import webhooks
from scheduler.webhooks import BatchWebhookSpec, Endpoint, WebhookSpec

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=refusals(401))


class EndpointRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="http(s) URL on a host the admin allows (webhooks.allow).")


async def _allowed(services: Services, url: str, resolve: bool) -> None:
    """422 with the reason when the URL is malformed or its host is not allowed."""
    allow = services.settings.webhooks.allow
    problem = await asyncio.to_thread(webhooks.check_url, url, allow, resolve)
    if problem is not None:
        raise HTTPException(422, [{"loc": ["body", "url"], "msg": problem, "type": "value_error"}])


@router.post("", status_code=201, response_model=Endpoint, responses=refusals(413))
async def register(body: EndpointRequest, services: ServicesDep, caller: Caller) -> Endpoint:
    """Registers the URL for this key (again: the same endpoint, re-enabled if a 410 disabled it).
    The answer carries the signing secret; GET /v1/webhooks shows it again to the same key."""
    await _allowed(services, body.url, resolve=True)
    return await asyncio.to_thread(webhooks.register_endpoint, services.enqueuer.client, caller.id, body.url)


@router.get("", response_model=list[Endpoint])
async def list_endpoints(services: ServicesDep, caller: Caller) -> list[Endpoint]:
    return await asyncio.to_thread(webhooks.list_endpoints, services.enqueuer.client, caller.id)


@router.delete("/{endpoint_id}", status_code=204, responses=refusals(404))
async def delete(
    services: ServicesDep, caller: Caller, endpoint_id: Annotated[str, Path(pattern=r"^ep_[0-9a-f]{1,64}$")]
) -> None:
    gone = await asyncio.to_thread(webhooks.delete_endpoint, services.enqueuer.client, caller.id, endpoint_id)
    if not gone:
        raise HTTPException(404, f"no webhook endpoint {endpoint_id!r} for this key")


async def endpoint_for_job(services: Services, caller: ApiKey, spec: WebhookSpec | BatchWebhookSpec) -> str:
    """The registered, enabled endpoint a job's (or a batch's) webhook names (its id), or 422
    saying why not."""
    await _allowed(services, spec.url, resolve=False)
    endpoint = await asyncio.to_thread(webhooks.endpoint_for, services.enqueuer.client, caller.id, spec.url)

    def refuse(msg: str) -> HTTPException:
        return HTTPException(422, [{"loc": ["body", "webhook", "url"], "msg": msg, "type": "value_error"}])

    if endpoint is None:
        raise refuse(
            "register this URL first (POST /v1/webhooks): that is where its signing secret comes from"
        )
    if endpoint.disabled:
        raise refuse(
            f"this endpoint is disabled ({endpoint.disabled_reason}); POST /v1/webhooks re-enables it"
        )
    return endpoint.id
