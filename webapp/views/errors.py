"""One place decides how an error looks: the JSON envelope under /api/, a page elsewhere."""

from __future__ import annotations

import logging
import traceback

from flask import Flask, jsonify, make_response, render_template, request
from sqlalchemy.exc import DBAPIError, OperationalError
from werkzeug.exceptions import HTTPException, SecurityError

from ..auth import user_or_anonymous
from ..errors import AppError, RateLimitedError
from ..extensions import db

log = logging.getLogger(__name__)

CODES = {
    400: "bad_request",
    401: "unauthorized",
    402: "budget_exceeded",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}
MESSAGES = {
    404: "There is nothing at this address.",
    405: "This address does not accept that method.",
    413: "The request body is larger than the 1 MiB limit.",
    500: "Something went wrong on our side. It has been logged; please try again.",
}


def wants_json() -> bool:
    return request.path.startswith("/api/")


def error_response(status: int, message: str, details: dict | None = None, code: str | None = None, headers=None):
    """Render an error for the caller: the JSON envelope for the API, a page otherwise."""
    if isinstance(request.routing_exception, SecurityError):
        return untrusted_host(request.routing_exception)  # whatever else failed: no page for that host
    code = code or CODES.get(status, "error")
    if wants_json():
        response = jsonify({"error": {"code": code, "message": message, "details": details}})
    else:
        user_or_anonymous()
        response = make_response(render_template("error.html", status=status, message=message, details=details))
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def validation_response(exc):
    """Return the 422 envelope for a pydantic ValidationError, one message per field."""
    details: dict[str, str] = {}
    for item in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in item["loc"]) or "body"
        details.setdefault(field, item["msg"])
    summary = "; ".join(f"{field}: {msg}" for field, msg in details.items())
    return error_response(422, f"The request is not valid: {summary}", details)


def database_error_summary(exc: DBAPIError) -> str:
    """Say what went wrong in the database without the values involved.

    The driver's message carries PostgreSQL's DETAIL ("Failing row contains (…)", "Key (username)=
    (alice) already exists"), which holds user data: prompts, names, digests. The primary message
    names the constraint or the problem, and that is what is logged, with the stack.
    """
    orig = exc.orig
    diag = getattr(orig, "diag", None)
    primary = getattr(diag, "message_primary", None)
    return f"{type(exc).__name__} ({type(orig).__name__}): {primary or 'no message from the driver'}"


def untrusted_host(_exc: SecurityError):
    """Refuse a Host header outside TRUSTED_HOSTS: plain text, since no URL can be built for it."""
    response = make_response("This server does not answer for that host name: check the address you used.\n", 400)
    response.mimetype = "text/plain"
    return response


def init_app(app: Flask) -> None:
    # Before the HTTPException handler: an error page would build links on the untrusted host.
    app.register_error_handler(SecurityError, untrusted_host)

    @app.errorhandler(AppError)
    def app_error(exc: AppError):
        db.session.rollback()
        headers = {}
        if isinstance(exc, RateLimitedError) or getattr(exc, "retry_after", None):
            headers["Retry-After"] = str(exc.retry_after)
        if exc.status == 401 and wants_json():
            headers["WWW-Authenticate"] = 'Bearer realm="api"'  # RFC 6750: say which scheme to use
        return error_response(exc.status, exc.message, exc.details, exc.code, headers=headers)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if exc.response is not None:
            return exc.response  # already rendered (request validation aborts with our envelope)
        status = exc.code or 500
        message = MESSAGES.get(status) if exc.description == type(exc).description else exc.description
        # Keep what the exception says in headers (Allow on a 405, Retry-After), not its HTML type.
        headers = {name: value for name, value in exc.get_headers() if name.lower() != "content-type"}
        return error_response(status, message or exc.description or exc.name, headers=headers)

    @app.errorhandler(OperationalError)
    @app.errorhandler(DBAPIError)
    def database_error(exc):
        db.session.rollback()
        if isinstance(exc, OperationalError) or exc.connection_invalidated:
            log.warning("database unavailable: %s", type(exc.orig).__name__)
            return error_response(
                503,
                "The database is unavailable. Nothing was changed; try again in a few seconds.",
                headers={"Retry-After": "5"},
            )
        log.error(
            "database error on %s %s: %s\n%s",
            request.method,
            request.path,
            database_error_summary(exc),
            "".join(traceback.format_tb(exc.__traceback__)).rstrip(),
        )
        return error_response(500, MESSAGES[500])

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        db.session.rollback()
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, MESSAGES[500])
