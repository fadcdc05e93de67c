"""The Webhooks page: add endpoints, see how deliveries went, rotate, test, resend. Same service as the API."""

from __future__ import annotations

from datetime import timedelta

from flask import Blueprint, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from ..errors import ConflictError, ValidationError
from ..models import utcnow
from ..services import webhooks as service
from ..webhook_models import EVENT_TYPES
from .forms import flash_refused

bp = Blueprint("webhooks", __name__)


@bp.after_request
def no_store(response):
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def _render_list(form: dict | None = None, errors: dict | None = None, created=None, secret: str | None = None):
    endpoints = service.list_endpoints(current_user)
    return render_template(
        "webhooks.html",
        endpoints=endpoints,
        last=service.last_deliveries(endpoints),
        event_types=EVENT_TYPES,
        form=form or {"url": "", "description": "", "events": ["task.completed", "task.failed"]},
        errors=errors or {},
        created=created,
        secret=secret,
        cap=current_app.config["WEBHOOK_MAX_ENDPOINTS"],
    )


@bp.get("/webhooks")
@login_required
def index():
    return _render_list()


@bp.post("/webhooks")
@login_required
def create():
    """Add an endpoint and show its secret on this response only."""
    form = {
        "url": request.form.get("url", ""),
        "description": request.form.get("description", ""),
        "events": request.form.getlist("events"),
    }
    try:
        valid = service.validate(form["url"], form["events"], form["description"] or None)
        endpoint, secret = service.create_endpoint(current_user, valid)
    except ValidationError as exc:
        # 200, not 422: the form is the answer, with a message per field.
        return _render_list(form, exc.details or {"url": exc.message})
    return _render_list(created=endpoint, secret=secret)


def _render_endpoint(endpoint_id: int, secret: str | None = None):
    endpoint = service.get_endpoint(current_user, endpoint_id)
    return render_template(
        "webhook.html",
        endpoint=endpoint,
        deliveries=service.deliveries(current_user, endpoint_id),
        secret=secret,
        soon=_soon(),
    )


def _soon():
    """The log polls while a pending delivery is due before this (not for a retry hours away)."""
    return utcnow() + timedelta(seconds=60)


@bp.get("/webhooks/<id:endpoint_id>")
@login_required
def endpoint(endpoint_id: int):
    return _render_endpoint(endpoint_id)


@bp.get("/webhooks/<id:endpoint_id>/deliveries")
@login_required
def deliveries(endpoint_id: int):
    """The deliveries log alone: the page polls it while deliveries are pending."""
    endpoint = service.get_endpoint(current_user, endpoint_id)
    return render_template(
        "_deliveries.html", endpoint=endpoint, deliveries=service.deliveries(current_user, endpoint_id), soon=_soon()
    )


@bp.post("/webhooks/<id:endpoint_id>/rotate")
@login_required
def rotate(endpoint_id: int):
    """Give the endpoint a new secret, shown on this response only."""
    secret = service.rotate_secret(current_user, endpoint_id)
    return _render_endpoint(endpoint_id, secret=secret)


@bp.post("/webhooks/<id:endpoint_id>/test")
@login_required
def send_test(endpoint_id: int):
    with flash_refused(ValidationError):
        service.send_test(current_user, endpoint_id)
        flash("A test event is on its way; its delivery shows below in a moment.", "success")
    return redirect(url_for("webhooks.endpoint", endpoint_id=endpoint_id), code=303)


@bp.post("/webhooks/<id:endpoint_id>/enable")
@login_required
def enable(endpoint_id: int):
    service.enable(current_user, endpoint_id)
    flash("The endpoint is enabled again: new events go to it. Resend any that failed.", "success")
    return redirect(url_for("webhooks.endpoint", endpoint_id=endpoint_id), code=303)


@bp.post("/webhooks/<id:endpoint_id>/delete")
@login_required
def delete(endpoint_id: int):
    service.delete_endpoint(current_user, endpoint_id)
    flash("The endpoint is deleted; nothing more is sent to it.", "success")
    return redirect(url_for("webhooks.index"), code=303)


@bp.post("/webhooks/deliveries/<id:delivery_id>/resend")
@login_required
def resend(delivery_id: int):
    target = int(request.form.get("endpoint_id", 0) or 0)  # the page it was on, if the resend is refused
    with flash_refused(ValidationError, ConflictError):
        delivery = service.resend(current_user, delivery_id)
        flash(f"Delivery {delivery.message_id} is sent again.", "success")
        target = delivery.endpoint_id
    if not target:
        return redirect(url_for("webhooks.index"), code=303)
    return redirect(url_for("webhooks.endpoint", endpoint_id=target), code=303)
