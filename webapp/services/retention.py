"""Retention: finished tasks and webhook deliveries older than RETENTION_DAYS are deleted, in batches.

Only COMPLETED, FAILED and CANCELLED tasks whose `finished_at` is past the cut-off go; unfinished
tasks are never touched, however old; nor are deliveries still pending. Each batch is one short transaction through the
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
from ..webhook_models import DeliveryStatus, WebhookDelivery
from . import stats

log = logging.getLogger(__name__)

BATCH = 5000


def cleanup(batch: int = BATCH) -> int:
    """Delete finished tasks older than RETENTION_DAYS; return how many. RETENTION_DAYS=0 keeps everything."""
    days = current_app.config["RETENTION_DAYS"]
    if days <= 0:
        return 0
    cutoff = utcnow() - timedelta(days=days)
    deleted = delete_in_batches(Task.id, (Task.status.in_(FINISHED), Task.finished_at < cutoff), batch)
    if deleted:
        log.info("retention: deleted %s finished tasks older than %s days", deleted, days)
        stats.forget(redis())
    return deleted


def cleanup_deliveries(batch: int = BATCH) -> int:
    """Delete finished webhook deliveries older than RETENTION_DAYS (0 keeps them); return how many."""
    days = current_app.config["RETENTION_DAYS"]
    if days <= 0:
        return 0
    cutoff = utcnow() - timedelta(days=days)
    finished = (WebhookDelivery.status != DeliveryStatus.PENDING.value, WebhookDelivery.created_at < cutoff)
    deleted = delete_in_batches(WebhookDelivery.id, finished, batch)
    if deleted:
        log.info("retention: deleted %s webhook deliveries older than %s days", deleted, days)
    return deleted


def delete_in_batches(id_column, conditions: tuple, batch: int = BATCH) -> int:
    """Delete the rows of `id_column`'s table that meet `conditions`, `batch` per transaction; return how many."""
    table = id_column.table
    deleted = 0
    while True:
        ids = select(id_column).where(*conditions).limit(batch)
        count = db.session.execute(delete(table).where(id_column.in_(ids.scalar_subquery()))).rowcount
        db.session.commit()
        deleted += count
        if count < batch:
            return deleted
