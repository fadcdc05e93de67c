"""JSON API v1: parse, call a service, return the task. Documented at /api/v1/openapi.json."""

from __future__ import annotations

import hmac

from flask import current_app, g, jsonify, request, url_for
from flask_openapi3 import APIBlueprint, Tag
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import RequestEntityTooLarge

from .. import __version__
from ..auth import api_user, bearer_token
from ..catalog import catalog
from ..config import UPLOAD_ENDPOINTS
from ..errors import AuthError, ValidationError
from ..extensions import db
from ..schemas import (
    ErrorEnvelope,
    Health,
    ModelList,
    SubmitHeaders,
    TaskCreate,
    TaskList,
    TaskOut,
    TaskPath,
    TaskQuery,
    UsageOut,
    UsageQuery,
)
from ..services import health as health_service
from ..services import tasks as service
from ..services import usage as usage_service
from ..services.accounts import TOKEN_PREFIX

tasks_tag = Tag(name="tasks", description="Submit prompts and follow their answers")
usage_tag = Tag(name="usage", description="What your answers cost, and your monthly budget")
meta_tag = Tag(name="meta", description="Models and health")
BEARER = [{"bearer": []}]
# Errors any authenticated call can answer with, documented on every operation.
COMMON = {401: ErrorEnvelope, 422: ErrorEnvelope, 429: ErrorEnvelope, 503: ErrorEnvelope}
# Where work is accepted, the owner's monthly budget may refuse it.
BUDGET = {402: ErrorEnvelope}
BODY_ERRORS = {400: ErrorEnvelope, 413: ErrorEnvelope, 415: ErrorEnvelope, 422: ErrorEnvelope}
PUBLIC_ENDPOINTS = {"api.health", "api.openapi"}
# Calls whose body must be a JSON object (a plain 415/400/422 before validation).
JSON_BODIES = {"api.create_task", "api.create_webhook", "api.create_batch"}
# Query parameters other APIs read tokens from; ours never does, and says so.
CREDENTIAL_PARAMETERS = {"access_token", "token", "api_key", "apikey", "api-key", "key", "auth", "authorization"}


def _operation_id(*, name: str, path: str, method: str) -> str:
    return name  # the view's name: createTask-style ids without path noise


bp = APIBlueprint("api", __name__, url_prefix="/api/v1", operation_id_callback=_operation_id)


@bp.before_request
def check_request():
    """Refuse oversized bodies and unknown callers before anything touches the database."""
    limit = request.max_content_length
    if request.content_length is not None and request.content_length > limit:
        raise RequestEntityTooLarge()
    # A chunked body has no length to check: read it now, so an oversized one is refused before
    # the token lookup. werkzeug stops reading at the limit without a word (the truncated body
    # could even parse), so reaching the limit is the refusal.
    # (A file upload is not read here: the form parser stops it at its own, larger limit.)
    chunked = request.content_length is None and request.method in ("POST", "PUT", "PATCH")
    chunked = chunked and request.endpoint not in UPLOAD_ENDPOINTS
    if chunked and len(request.get_data(cache=True)) >= limit:
        raise RequestEntityTooLarge()
    if _credentials_in_url():
        raise AuthError(
            "API tokens are never accepted in the URL, where they end up in logs and browser history: "
            "send it as 'Authorization: Bearer <token>'. If that was a real token, revoke it on the Tokens page."
        )
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    user = api_user()
    if user is None:
        raise AuthError(
            "Send a valid API token as 'Authorization: Bearer <token>': create one on the Tokens page "
            "(/tokens) or with `flask --app wsgi tokens create USERNAME`."
        )
    g.user = user
    if request.method == "POST" and request.endpoint in JSON_BODIES:
        _require_json_object()
    return None


def _credentials_in_url() -> bool:
    """Whether the query string carries something that looks like a credential."""
    return any(
        name.lower() in CREDENTIAL_PARAMETERS or value.startswith(TOKEN_PREFIX)
        for name, value in request.args.items(multi=True)
    )


def _require_json_object() -> None:
    """Make a bad body a 415, 400 or 422 with a plain message instead of a validation puzzle."""
    from werkzeug.exceptions import BadRequest, UnsupportedMediaType

    if not request.is_json:
        raise UnsupportedMediaType("Send the task as JSON with 'Content-Type: application/json'.")
    try:
        body = request.get_json()
    except BadRequest:
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ValidationError("The request body must be a JSON object.", {"body": "expected an object"})


def _task_response(task, status: int):
    headers = {"Location": url_for("api.get_task", task_id=task.id)}
    return task.to_dict(), status, headers


@bp.post(
    "/tasks",
    tags=[tasks_tag],
    summary="Submit a prompt",
    security=BEARER,
    responses={202: TaskOut, **BUDGET, **BODY_ERRORS, **COMMON},
)
def create_task(body: TaskCreate, header: SubmitHeaders):
    """Record the task and queue it; poll the Location to follow it."""
    params = body.params or None
    submission = service.validate_submission(
        body.prompt,
        model=body.model,
        priority=body.priority,
        max_tokens=params.max_tokens if params else None,
        temperature=params.temperature if params else None,
        system=params.system if params else None,
    )
    task, _ = service.submit(g.user, submission, idempotency_key=header.idempotency_key)
    return _task_response(task, 202)


@bp.get(
    "/tasks",
    tags=[tasks_tag],
    summary="List your tasks, newest first",
    security=BEARER,
    responses={200: TaskList, **COMMON},
)
def list_tasks(query: TaskQuery):
    items, next_cursor = service.list_tasks(g.user, status=query.status, limit=query.limit, cursor=query.cursor)
    return {"items": [task.to_dict() for task in items], "next_cursor": next_cursor}


@bp.get(
    "/tasks/<int:task_id>",
    tags=[tasks_tag],
    summary="One task, with the answer so far",
    security=BEARER,
    responses={200: TaskOut, 404: ErrorEnvelope, **COMMON},
)
def get_task(path: TaskPath):
    return service.get_task(g.user, path.task_id).to_dict()


@bp.post(
    "/tasks/<int:task_id>/cancel",
    tags=[tasks_tag],
    summary="Cancel a pending or running task",
    security=BEARER,
    responses={200: TaskOut, 404: ErrorEnvelope, 409: ErrorEnvelope, **COMMON},
)
def cancel_task(path: TaskPath):
    return service.cancel(g.user, path.task_id).to_dict()


@bp.post(
    "/tasks/<int:task_id>/retry",
    tags=[tasks_tag],
    summary="Run a failed or cancelled task again",
    security=BEARER,
    responses={202: TaskOut, 404: ErrorEnvelope, 409: ErrorEnvelope, **BUDGET, **COMMON},
)
def retry_task(path: TaskPath):
    return _task_response(service.retry(g.user, path.task_id), 202)


@bp.delete(
    "/tasks/<int:task_id>",
    tags=[tasks_tag],
    summary="Delete a task (cancelling it first if it runs)",
    security=BEARER,
    responses={204: None, 404: ErrorEnvelope, **COMMON},
)
def delete_task(path: TaskPath):
    service.delete_task(g.user, path.task_id)
    return "", 204


@bp.get(
    "/usage",
    tags=[usage_tag],
    summary="A month's spend, held reservations and budget, by model and by day",
    security=BEARER,
    responses={200: UsageOut, **COMMON},
)
def get_usage(query: UsageQuery):
    month = usage_service.parse_month(query.month)
    return usage_service.month_usage(g.user, month).to_dict()


@bp.get("/models", tags=[meta_tag], summary="Models you can use", security=BEARER, responses={200: ModelList, **COMMON})
def list_models():
    cat = catalog()
    return {"items": [spec.public(cat.default) for spec in sorted(cat, key=lambda s: s.name)]}


@bp.get(
    "/health",
    tags=[meta_tag],
    summary="Database, Redis and workers",
    responses={200: Health, 422: ErrorEnvelope, 503: Health},
)
def health():
    """Healthy or not, for anyone; the version and each check's details for an admin's token or METRICS_TOKEN."""
    report = health_service.report(current_app.config["APP_NAME"], __version__)
    status = 200 if report["status"] == "healthy" else 503
    return (report if _sees_health_details() else health_service.public(report)), status


def _sees_health_details() -> bool:
    token = bearer_token()
    if token is None:
        return False
    expected = current_app.config.get("METRICS_TOKEN")
    if expected and hmac.compare_digest(token.encode(), expected.encode()):
        return True
    try:
        user = api_user()
    except SQLAlchemyError:  # the database is what is down: the report says so, to anyone
        db.session.rollback()
        return False
    return user is not None and user.is_admin


@bp.get("/openapi.json", tags=[meta_tag], summary="This document", doc_ui=False)
def openapi():
    return jsonify(current_app.api_doc)
