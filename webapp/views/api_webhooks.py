"""JSON API v1: webhook endpoints (POST/GET/DELETE /api/v1/webhooks), on the API's blueprint.

Importing this module adds its routes to `views.api.bp` (create_app imports it before the
blueprint is registered), so the API's checks (bearer token, body size, JSON) apply here too.
"""

from __future__ import annotations

from datetime import datetime

from flask import g, url_for
from flask_openapi3 import Tag
from pydantic import BaseModel, ConfigDict, Field

from ..schemas import ErrorEnvelope
from ..services import webhooks as service
from ..webhook_models import EVENT_TYPES
from .api import BEARER, BODY_ERRORS, COMMON, bp

tag = Tag(name="webhooks", description="Be told when tasks and batches finish: signed per Standard Webhooks")


class WebhookCreate(BaseModel):
    # Types are checked here; the URL's rules (scheme, length, address) and the event names are
    # checked by the service, which says which rule a value broke.
    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="Your receiver: http or https, a public address, at most 2,048 characters.")
    events: list[str] = Field(description=f"One or more of: {', '.join(EVENT_TYPES)}.")
    description: str | None = Field(None, description="A note for you, at most 200 characters.")


class WebhookOut(BaseModel):
    id: int
    url: str
    events: list[str]
    description: str | None
    enabled: bool
    disabled_reason: str | None
    created_at: datetime
    failing_since: datetime | None


class WebhookCreated(WebhookOut):
    secret: str = Field(description="whsec_ and base64: verify deliveries with it. Shown this once.")


class WebhookList(BaseModel):
    items: list[WebhookOut]


class WebhookPath(BaseModel):
    webhook_id: int = Field(ge=1, le=2**63 - 1)


@bp.post(
    "/webhooks",
    tags=[tag],
    summary="Add a webhook endpoint",
    security=BEARER,
    responses={201: WebhookCreated, **BODY_ERRORS, **COMMON},
)
def create_webhook(body: WebhookCreate):
    """Add an endpoint; the answer carries its signing secret, shown this once."""
    form = service.validate(body.url, body.events, body.description)
    endpoint, secret = service.create_endpoint(g.user, form)
    headers = {"Location": url_for("api.list_webhooks")}
    return {**endpoint.to_dict(), "secret": secret}, 201, headers


@bp.get(
    "/webhooks", tags=[tag], summary="Your webhook endpoints", security=BEARER, responses={200: WebhookList, **COMMON}
)
def list_webhooks():
    return {"items": [endpoint.to_dict() for endpoint in service.list_endpoints(g.user)]}


@bp.delete(
    "/webhooks/<int:webhook_id>",
    tags=[tag],
    summary="Delete a webhook endpoint",
    security=BEARER,
    responses={204: None, 404: ErrorEnvelope, **COMMON},
)
def delete_webhook(path: WebhookPath):
    service.delete_endpoint(g.user, path.webhook_id)
    return "", 204
