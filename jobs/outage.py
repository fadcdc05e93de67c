"""Riding out a database outage: a worker's writes wait for PostgreSQL to come back.

`with_database` retries a write while the connection is being re-established, so a restart of
PostgreSQL delays work instead of failing it. (The writes themselves, the status changes of an
attempt, are `webapp/lifecycle/attempts.py`.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from flask import current_app
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from webapp.extensions import db

log = logging.getLogger(__name__)

T = TypeVar("T")


def database_unavailable(exc: BaseException) -> bool:
    """Return whether an error means the database is unreachable (as opposed to a bad query)."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def with_database(action: Callable[[], T], seconds: float | None = None) -> T:
    """Run `action` (a write that commits), retrying while the database is unreachable.

    Waits with capped exponential backoff for up to `seconds` (DB_RETRY_SECONDS), then lets
    the error through. Each try starts from a clean session, so a connection the restart
    broke is discarded and a new one made.
    """
    limit = current_app.config["DB_RETRY_SECONDS"] if seconds is None else seconds
    deadline = time.monotonic() + limit
    pause = 0.2
    while True:
        try:
            return action()
        except DBAPIError as exc:
            db.session.rollback()
            if not database_unavailable(exc) or time.monotonic() + pause > deadline:
                raise
            log.warning("database unavailable (%s); retrying in %.1f s", type(exc.orig).__name__, pause)
        time.sleep(pause)
        pause = min(pause * 2, 2.0)
