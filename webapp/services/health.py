"""Health: can we reach the database and Redis, and are workers alive?

Anyone may ask (load balancers, compose's healthcheck), and anyone gets the contract's shape,
but only "healthy" or not and each check's status: the version, latencies, worker counts and
error classes help an attacker more than a monitor, so they go only to admins' API tokens and
the METRICS_TOKEN bearer (webapp/views/api.py decides who).
"""

from __future__ import annotations

import time

from sqlalchemy import text

from ..extensions import db
from ..models import utcnow
from ..queues import live_workers, redis


def _timed(probe) -> dict:
    start = time.perf_counter()
    try:
        extra = probe() or {}
    except Exception as exc:  # any failure of a dependency is the answer, not an error
        # The class name says enough; messages can carry hosts and user names.
        return {"status": "error", "error": f"unreachable ({type(exc).__name__})"}
    return {"status": "ok", "latency_ms": round((time.perf_counter() - start) * 1000, 2), **extra}


def _database() -> None:
    try:
        db.session.execute(text("SELECT 1"))
    finally:
        db.session.rollback()


def _redis() -> None:
    redis().ping()


def _workers() -> dict:
    return {"count": len(live_workers(redis()))}


def report(app_name: str, version: str) -> dict:
    """Return the health document: unhealthy when the database or Redis cannot be reached."""
    checks = {"database": _timed(_database), "redis": _timed(_redis)}
    if checks["redis"]["status"] == "ok":
        checks["workers"] = _timed(_workers)
        if checks["workers"].get("count") == 0:
            # The web side is fine without workers; tasks simply wait. Say so, do not fail.
            checks["workers"]["status"] = "none"
    else:
        checks["workers"] = {"status": "error", "error": "unknown while Redis is unreachable"}
    healthy = checks["database"]["status"] == "ok" and checks["redis"]["status"] == "ok"
    return {
        "status": "healthy" if healthy else "unhealthy",
        "app_name": app_name,
        "version": version,
        "timestamp": utcnow().isoformat().replace("+00:00", "Z"),
        "checks": checks,
    }


def public(report: dict) -> dict:
    """Return the report for anyone: the same keys, no version, each check's status only."""
    return {
        **report,
        "version": None,
        "checks": {name: {"status": check["status"]} for name, check in report["checks"].items()},
    }
