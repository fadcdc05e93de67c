"""GET /metrics: Prometheus text for an admin session or the METRICS_TOKEN bearer."""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, current_app
from flask_login import current_user
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..auth import bearer_token
from ..errors import AuthError, ForbiddenError, NotFoundError
from ..metrics_collector import AppCollector

bp = Blueprint("metrics", __name__)


def _check_access() -> None:
    """Let in an admin session or the METRICS_TOKEN bearer; 404 when metrics are off."""
    config = current_app.config
    if not config["METRICS_ENABLED"]:
        raise NotFoundError("Metrics are turned off on this server (METRICS_ENABLED=false).")
    token = bearer_token()
    expected = config.get("METRICS_TOKEN")
    if token is not None:
        if expected and hmac.compare_digest(token.encode(), expected.encode()):
            return
        raise AuthError("The metrics token is not valid.")
    if not current_user.is_authenticated:
        raise AuthError("Metrics need an admin session or `Authorization: Bearer <METRICS_TOKEN>`.")
    if not current_user.is_admin:
        raise ForbiddenError("Metrics are for administrators.")


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text exposition of every metric (see webapp/metrics_collector.py)."""
    _check_access()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AppCollector(current_app.extensions["redis"]))
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})
