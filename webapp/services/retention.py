"""Retention: finished tasks older than RETENTION_DAYS are deleted, in batches.

Only COMPLETED, FAILED and CANCELLED tasks whose `finished_at` is past the cut-off go; unfinished
tasks are never touched, however old. Each batch is one short transaction through the
(status, finished_at) index, so a million-row backlog does not hold long locks.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from flask import current_app
from sqlalchemy import delete, select

from ..extensions import db
from ..models import FINISHED, Task, utcnow
from ..queues import redis
from . import stats

log = logging.getLogger(__name__)

BATCH = 5000


def cleanup(batch: int = BATCH) -> int:
    """Delete finished tasks older than RETENTION_DAYS; return how many. RETENTION_DAYS=0 keeps everything."""
    days = current_app.config["RETENTION_DAYS"]
    if days <= 0:
        return 0
    cutoff = utcnow() - timedelta(days=days)
    deleted = 0
    while True:
        ids = select(Task.id).where(Task.status.in_(FINISHED), Task.finished_at < cutoff).limit(batch)
        count = db.session.execute(delete(Task).where(Task.id.in_(ids.scalar_subquery()))).rowcount
        db.session.commit()
        deleted += count
        if count < batch:
            break
    if deleted:
        log.info("retention: deleted %s finished tasks older than %s days", deleted, days)
        stats.forget(redis())
    return deleted
