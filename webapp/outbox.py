"""The webhook outbox: deliveries written with the change they tell of, and woken up after it.

`record_task_events(connection, rows)` and `record_batch_events(connection, rows)` are called by
the lifecycle (`lifecycle/hooks.py`) on the connection of the change that finishes the tasks or
the batch, inside its transaction: the delivery rows commit with the
change or not at all. The delivery jobs are enqueued as that transaction commits; a job that
arrives before the commit is visible waits a moment for it (`jobs.deliver`), and one whose
transaction rolled back finds no row and ends. Should Redis lose a job, or the process die
between the commit and the enqueue, `sweep()` (the scheduler, every SWEEP_INTERVAL) enqueues
every pending delivery that is overdue. PostgreSQL is the record; Redis only wakes workers.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from flask import current_app
from redis.exceptions import RedisError
from sqlalchemy import Connection, event, func, insert, inspect, or_, select

from .batch_models import Batch
from .extensions import db
from .models import Task, _iso, utcnow
from .queues import get_queue
from .webhook_models import DeliveryStatus, WebhookDelivery, WebhookEndpoint

log = logging.getLogger(__name__)

QUEUE = "webhooks"
DELIVER = "jobs.deliver.deliver"
# RQ's limit for one job: a try takes at most WEBHOOK_TIMEOUT (10 s), plus the bookkeeping.
JOB_TIMEOUT = 60
# A pending delivery this far past its time has lost its job (Redis lost it, or the process
# died between the commit and the enqueue): the sweep enqueues it again.
SWEEP_GRACE_SECONDS = 60
TASK_EVENTS = {"COMPLETED": "task.completed", "FAILED": "task.failed", "CANCELLED": "task.cancelled"}
BATCH_EVENTS = {
    "completed": "batch.completed",
    "failed": "batch.failed",
    "cancelled": "batch.cancelled",
    "expired": "batch.expired",
}
_deliveries = WebhookDelivery.__table__
_endpoints = WebhookEndpoint.__table__


@dataclass(frozen=True)
class Event:
    """Something a user's endpoints may hear about."""

    user_id: int
    type: str
    subject: str
    data: dict


def parse_delays(raw: object) -> list[float]:
    """Return WEBHOOK_RETRY_DELAYS as seconds; raise ValueError when it is not numbers separated by commas."""
    try:
        delays = [float(part) for part in str(raw).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"WEBHOOK_RETRY_DELAYS must be seconds separated by commas, not {raw!r}") from None
    if any(delay < 0 for delay in delays):
        raise ValueError(f"WEBHOOK_RETRY_DELAYS must not be negative: {raw!r}")
    return delays


def new_message_id() -> str:
    return "msg_" + secrets.token_urlsafe(18)


def payload(event_type: str, data: dict, at: datetime | None = None) -> str:
    """Return the body of an event, serialized once: the bytes sent are the bytes signed."""
    body = {"type": event_type, "timestamp": _iso(at or utcnow()), "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def task_object(row: Mapping) -> dict:
    """Return a task row (any mapping of the tasks columns) as the API shows it."""
    columns = Task.__table__.columns.keys()
    return Task(**{name: row[name] for name in columns if name in row}).to_dict()


def record_task_events(connection: Connection, rows: Iterable[Mapping]) -> list[int]:
    """Write the deliveries of tasks that just finished (rows of the tasks table); return their ids.

    Call it inside the transaction that finishes them. A row whose status has no event is skipped.
    """
    return _record_endings(connection, rows, TASK_EVENTS, "task", task_object)


def batch_object(row: Mapping) -> dict:
    """Return an ended batch's row (a mapping of the batches columns) as GET /api/v1/batches/<id> shows it."""
    # Attribute and column names differ (metadata_ is the column "metadata").
    columns = {attr.key: attr.columns[0].name for attr in inspect(Batch).column_attrs}
    fields = {key: row[name] for key, name in columns.items() if name in row}
    return Batch(**fields).to_dict()  # an ended batch's request_counts are the ones recorded at its end


def record_batch_events(connection: Connection, rows: Iterable[Mapping]) -> list[int]:
    """Write the deliveries of batches that just ended (rows of the batches table); return their ids.

    Call it inside the transaction that ends them. A row whose status has no event is skipped.
    """
    return _record_endings(connection, rows, BATCH_EVENTS, "batch", batch_object)


def _record_endings(
    connection: Connection, rows: Iterable[Mapping], types: dict[str, str], noun: str, shown: Callable[[Mapping], dict]
) -> list[int]:
    """Write the deliveries of rows that just reached a status in `types` (status -> event type)."""
    events = [
        Event(row["user_id"], types[row["status"]], f"{noun} {row['id']}", shown(row))
        for row in rows
        if row["status"] in types
    ]
    return record(connection, events)


def record(connection: Connection, events: list[Event]) -> list[int]:
    """Write one delivery per event and subscribed, enabled endpoint; enqueue them at the commit."""
    if not events:
        return []
    users = {e.user_id for e in events}
    endpoints = connection.execute(
        select(_endpoints.c.id, _endpoints.c.user_id, _endpoints.c.events).where(
            _endpoints.c.user_id.in_(users), _endpoints.c.disabled_at.is_(None)
        )
    ).all()
    if not endpoints:
        return []
    now = utcnow()
    values = []
    for item in events:
        body = None
        for endpoint in endpoints:
            if endpoint.user_id == item.user_id and item.type in (endpoint.events or []):
                body = body or payload(item.type, item.data, now)
                values.append(_row(endpoint.id, item.type, item.subject, body, now))
    if not values:
        return []
    ids = list(connection.execute(insert(_deliveries).returning(_deliveries.c.id), values).scalars())
    enqueue_at_commit(connection, ids)
    return ids


def _row(endpoint_id: int, event_type: str, subject: str, body: str, now: datetime) -> dict:
    return dict(
        endpoint_id=endpoint_id,
        message_id=new_message_id(),
        event_type=event_type,
        subject=subject,
        payload=body,
        status=DeliveryStatus.PENDING.value,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )


def enqueue_at_commit(connection: Connection, ids: list[int]) -> None:
    """Enqueue the deliveries' jobs when `connection` commits (not at all if it rolls back)."""
    app = current_app._get_current_object()

    def committing(conn) -> None:
        with app.app_context():
            for delivery_id in ids:
                enqueue(delivery_id)

    event.listen(connection, "commit", committing, once=True)


def enqueue(delivery_id: int, delay: float = 0) -> None:
    """Wake a delivery worker for one delivery (after `delay` seconds); Redis down is left to the sweep."""
    queue = get_queue(QUEUE)
    options = dict(job_timeout=JOB_TIMEOUT, result_ttl=0, failure_ttl=24 * 3600, description=f"delivery {delivery_id}")
    try:
        if delay > 0:
            queue.enqueue_in(timedelta(seconds=delay), DELIVER, delivery_id, **options)
        else:
            queue.enqueue(DELIVER, delivery_id, **options)
    except RedisError as exc:
        log.warning("delivery %s recorded but not enqueued (%s); the sweep will", delivery_id, type(exc).__name__)


def sweep(limit: int = 1000) -> int:
    """Enqueue pending deliveries whose time is long past and that no try holds; return how many.

    A delivery whose job still waits in Redis is enqueued twice; the try claims the row, so
    only one of them sends.
    """
    now = utcnow()
    ids = db.session.scalars(
        select(_deliveries.c.id)
        .where(
            _deliveries.c.status == DeliveryStatus.PENDING.value,
            _deliveries.c.next_attempt_at < now - timedelta(seconds=SWEEP_GRACE_SECONDS),
            or_(_deliveries.c.lease_until.is_(None), _deliveries.c.lease_until < now),
        )
        .order_by(_deliveries.c.next_attempt_at)
        .limit(limit)
    ).all()
    db.session.commit()
    for delivery_id in ids:
        enqueue(delivery_id)
    if ids:
        log.info("webhooks: %s overdue deliveries enqueued again", len(ids))
    return len(ids)


def oldest_pending_age() -> float:
    """Return the age in seconds of the oldest undelivered event (0 when none waits)."""
    oldest = db.session.scalar(
        select(func.min(_deliveries.c.created_at)).where(_deliveries.c.status == DeliveryStatus.PENDING.value)
    )
    db.session.commit()
    if oldest is None:
        return 0.0
    if oldest.tzinfo is None:  # SQLite through a Core select
        from datetime import UTC

        oldest = oldest.replace(tzinfo=UTC)
    return max(0.0, (utcnow() - oldest).total_seconds())
