"""What users do with webhook endpoints: add, list, delete, rotate a secret, test, resend.

Pages and API both call these. The outbox itself (deliveries written with the change they tell
of) is `webapp/outbox.py`; the tries are `jobs/deliver.py`.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from datetime import timedelta

from flask import current_app
from sqlalchemy import func, select

from .. import outbox
from ..errors import ConflictError, NotFoundError, ValidationError
from ..extensions import db
from ..models import User, utcnow
from ..netguard import RefusedError, check_url
from ..webhook_models import EVENT_TYPES, TEST_EVENT, DeliveryStatus, WebhookDelivery, WebhookEndpoint
from .tasks import text_problem

SECRET_BYTES = 32
DESCRIPTION_MAX = 200
LOG_LIMIT = 50


def new_secret() -> str:
    """Return a Standard Webhooks secret: whsec_ and the base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


@dataclass(frozen=True)
class EndpointForm:
    url: str
    events: list[str]
    description: str | None


def validate(url: object, events: object, description: object = None) -> EndpointForm:
    """Check an endpoint's fields; raise ValidationError with a reason per field."""
    errors: dict[str, str] = {}
    if not isinstance(url, str):
        errors["url"] = "Enter the URL of your receiver, like https://example.com/hooks."
    else:
        try:
            check_url(url.strip(), bool(current_app.config["WEBHOOK_ALLOW_LOOPBACK"]))
        except RefusedError as exc:
            errors["url"] = f"The URL is refused: {exc}."
    chosen: list[str] = []
    if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
        errors["events"] = f"Choose one or more events: {', '.join(EVENT_TYPES)}."
    else:
        unknown = [e for e in events if e not in EVENT_TYPES]
        if unknown:
            errors["events"] = f"Unknown event type {unknown[0]!r}; choose from {', '.join(EVENT_TYPES)}."
        chosen = [e for e in EVENT_TYPES if e in events]
    if description is not None and not isinstance(description, str):
        errors["description"] = "The description must be text."
    elif description:
        if len(description) > DESCRIPTION_MAX:
            errors["description"] = f"The description is limited to {DESCRIPTION_MAX} characters."
        elif problem := text_problem(description):
            errors["description"] = f"The description {problem}."
    if errors:
        raise ValidationError("The webhook endpoint was not added: " + " ".join(errors.values()), errors)
    return EndpointForm(url.strip(), chosen, (description or "").strip() or None)


def create_endpoint(user: User, form: EndpointForm) -> tuple[WebhookEndpoint, str]:
    """Add an endpoint for the user; return it and its secret (shown this once)."""
    cap = current_app.config["WEBHOOK_MAX_ENDPOINTS"]
    # The user's row lock makes the count and the insert one step: two racing requests wait in turn.
    db.session.execute(select(User.id).where(User.id == user.id).with_for_update())
    count = db.session.scalar(select(func.count()).where(WebhookEndpoint.user_id == user.id))
    if count >= cap:
        db.session.rollback()
        raise ValidationError(
            f"You have {count} webhook endpoints, the most allowed. Delete one before adding another.",
            {"url": f"at most {cap} endpoints per user"},
        )
    secret = new_secret()
    endpoint = WebhookEndpoint(
        user_id=user.id, url=form.url, events=form.events, description=form.description, secret=secret
    )
    db.session.add(endpoint)
    db.session.commit()
    return endpoint, secret


def list_endpoints(user: User) -> list[WebhookEndpoint]:
    return list(
        db.session.scalars(
            select(WebhookEndpoint).where(WebhookEndpoint.user_id == user.id).order_by(WebhookEndpoint.id)
        )
    )


def get_endpoint(user: User, endpoint_id: int) -> WebhookEndpoint:
    """Return one of the user's endpoints, or raise NotFoundError (another user's is not found)."""
    endpoint = db.session.scalar(
        select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.user_id == user.id)
    )
    if endpoint is None:
        raise NotFoundError(f"Webhook endpoint {endpoint_id} does not exist or is not yours.")
    return endpoint


def delete_endpoint(user: User, endpoint_id: int) -> None:
    """Delete an endpoint with its deliveries; what was still pending is not sent."""
    db.session.delete(get_endpoint(user, endpoint_id))
    db.session.commit()


def rotate_secret(user: User, endpoint_id: int) -> str:
    """Give the endpoint a new secret; deliveries carry the old one's signature too for a while."""
    endpoint = get_endpoint(user, endpoint_id)
    hours = current_app.config["WEBHOOK_SECRET_OVERLAP_HOURS"]
    endpoint.previous_secret = endpoint.secret
    endpoint.previous_secret_expires_at = utcnow() + timedelta(hours=hours)
    endpoint.secret = secret = new_secret()
    db.session.commit()
    return secret


def enable(user: User, endpoint_id: int) -> WebhookEndpoint:
    """Enable a disabled endpoint again (new events only: what failed stays failed, resend it)."""
    endpoint = get_endpoint(user, endpoint_id)
    endpoint.disabled_at = endpoint.disabled_reason = endpoint.failing_since = None
    db.session.commit()
    return endpoint


def send_test(user: User, endpoint_id: int) -> WebhookDelivery:
    """Queue a `webhook.test` event to the endpoint, whatever it subscribes to."""
    endpoint = get_endpoint(user, endpoint_id)
    if not endpoint.enabled:
        raise ValidationError("This endpoint is disabled; enable it first.", {"endpoint": "disabled"})
    now = utcnow()
    data = {"endpoint_id": endpoint.id, "message": "A test event from the Webhooks page."}
    body = outbox.payload(TEST_EVENT, data, now)
    delivery = WebhookDelivery(**outbox._row(endpoint.id, TEST_EVENT, f"endpoint {endpoint.id}", body, now))
    db.session.add(delivery)
    db.session.commit()
    outbox.enqueue(delivery.id)
    return delivery


def deliveries(user: User, endpoint_id: int, limit: int = LOG_LIMIT) -> list[WebhookDelivery]:
    """Return an endpoint's deliveries, newest first."""
    endpoint = get_endpoint(user, endpoint_id)
    query = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id)
    return list(db.session.scalars(query.order_by(WebhookDelivery.id.desc()).limit(limit)))


def last_deliveries(endpoints: list[WebhookEndpoint]) -> dict[int, WebhookDelivery]:
    """Return each endpoint's latest delivery, by endpoint id."""
    if not endpoints:
        return {}
    latest = (
        select(func.max(WebhookDelivery.id))
        .where(WebhookDelivery.endpoint_id.in_([e.id for e in endpoints]))
        .group_by(WebhookDelivery.endpoint_id)
    )
    rows = db.session.scalars(select(WebhookDelivery).where(WebhookDelivery.id.in_(latest.scalar_subquery())))
    return {row.endpoint_id: row for row in rows}


def resend(user: User, delivery_id: int) -> WebhookDelivery:
    """Send a delivery again, with the same webhook-id and body and a fresh retry schedule."""
    delivery = db.session.scalar(
        select(WebhookDelivery)
        .join(WebhookEndpoint)
        .where(WebhookDelivery.id == delivery_id, WebhookEndpoint.user_id == user.id)
    )
    if delivery is None:
        raise NotFoundError(f"Delivery {delivery_id} does not exist or is not yours.")
    if not delivery.endpoint.enabled:
        raise ValidationError("This endpoint is disabled; enable it first.", {"endpoint": "disabled"})
    lease = delivery.lease_until
    if delivery.status == DeliveryStatus.PENDING.value and lease is not None and lease > utcnow():
        raise ConflictError("This delivery is being tried right now; look again in a few seconds.")
    delivery.status = DeliveryStatus.PENDING.value
    delivery.attempts = 0
    delivery.next_attempt_at = utcnow()
    delivery.lease_until = delivery.finished_at = None
    db.session.commit()
    outbox.enqueue(delivery.id)
    return delivery
