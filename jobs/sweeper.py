"""The sweeper: PostgreSQL is the record, so every unfinished task must have a way forward.

- a PENDING task that no queue holds (Redis lost its data, or the process died between commit
  and enqueue) is enqueued again;
- a PROCESSING task whose lease expired (its worker died) goes back to PENDING, or to FAILED
  when it has no attempts left.
Duplicate jobs are harmless: the claim lets only one of them run.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from datetime import timedelta

from flask import current_app
from redis.exceptions import RedisError
from sqlalchemy import delete, or_, select, update

from webapp.extensions import db
from webapp.models import IdempotencyKey, Task, TaskStatus, utcnow
from webapp.queues import enqueue_task, redis
from webapp.services.tasks import job_timeout

log = logging.getLogger(__name__)

LOCK_KEY = "atr:sweeper:lock"
BATCH = 1000
# RQ job statuses that mean a job is still on its way to a worker.
HELD = {b"queued", b"scheduled", b"deferred", b"started"}


@dataclass
class SweepReport:
    requeued: list[int] = field(default_factory=list)
    reclaimed: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    skipped: bool = False

    def __str__(self) -> str:
        if self.skipped:
            return "sweep skipped: another sweeper holds the lock"
        return (
            f"sweep: {len(self.requeued)} re-enqueued, {len(self.reclaimed)} taken back from dead "
            f"workers, {len(self.failed)} failed with no attempts left"
        )


def sweep() -> SweepReport:
    """Run one pass, unless another process is sweeping right now."""
    connection = redis()
    token = secrets.token_hex(8)
    ttl = max(60, int(current_app.config["SWEEP_INTERVAL"]) * 2)
    if not connection.set(LOCK_KEY, token, nx=True, ex=ttl):
        return SweepReport(skipped=True)
    try:
        report = SweepReport()
        _take_back_expired(report)
        _requeue_orphans(report)
        _forget_idempotency_keys()
        if report.requeued or report.reclaimed or report.failed:
            log.info("%s", report)
        return report
    finally:
        # Release only our own lock (it may have expired and been taken by another sweeper).
        connection.eval(
            "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0",
            1,
            LOCK_KEY,
            token,
        )


def _take_back_expired(report: SweepReport) -> None:
    now = utcnow()
    expired = db.session.execute(
        select(Task.id, Task.attempts, Task.max_attempts)
        .where(Task.status == TaskStatus.PROCESSING.value, Task.lease_expires_at < now)
        .order_by(Task.id)
        .limit(BATCH)
    ).all()
    for task_id, attempts, max_attempts in expired:
        # Fenced like a worker's write: only if nobody renewed or finished it meanwhile.
        fence = update(Task).where(
            Task.id == task_id,
            Task.attempts == attempts,
            Task.status == TaskStatus.PROCESSING.value,
            Task.lease_expires_at < now,
        )
        if attempts >= max_attempts:
            values = dict(
                status=TaskStatus.FAILED.value,
                error_kind="worker_lost",
                error=f"The worker running this task stopped responding, and all {max_attempts} attempts "
                "are used. Retry the task.",
                lease_expires_at=None,
                finished_at=now,
            )
            outcome = report.failed
        else:
            values = dict(
                status=TaskStatus.PENDING.value,
                error_kind="worker_lost",
                error="The worker running this task stopped responding; it will run again.",
                lease_expires_at=None,
                result=None,
                progress=0,
                run_after=now,
                job_id=None,
            )
            outcome = report.reclaimed
        if db.session.execute(fence.values(**values)).rowcount:
            outcome.append(task_id)
        db.session.commit()
    # The reclaimed tasks are PENDING with no job now: the orphan pass enqueues them.


def _requeue_orphans(report: SweepReport) -> None:
    now = utcnow()
    grace = now - timedelta(seconds=current_app.config["SWEEP_GRACE_SECONDS"])
    candidates = db.session.execute(
        select(Task.id, Task.priority, Task.model, Task.job_id, Task.run_after, Task.created_at)
        .where(
            Task.status == TaskStatus.PENDING.value,
            or_(Task.job_id.is_(None), Task.updated_at < grace),
        )
        .order_by(Task.id)
        .limit(BATCH)
    ).all()
    if not candidates:
        return
    connection = redis()
    with connection.pipeline(transaction=False) as pipe:
        for row in candidates:
            pipe.hget(f"rq:job:{row.job_id}", "status") if row.job_id else pipe.echo("")
        statuses = pipe.execute()
    for row, status in zip(candidates, statuses, strict=True):
        if row.job_id and status in HELD:
            continue
        if row.job_id is None and row.run_after is None and row.created_at >= grace:
            continue  # submitted a moment ago; its enqueue may still be under way
        delay = max(0.0, (row.run_after - now).total_seconds()) if row.run_after else 0.0
        try:
            job_id = enqueue_task(row.id, row.priority, job_timeout(row.model), delay)
        except RedisError:
            log.warning("sweeper: Redis unavailable; will retry next pass")
            return
        db.session.execute(
            update(Task).where(Task.id == row.id, Task.status == TaskStatus.PENDING.value).values(job_id=job_id)
        )
        db.session.commit()
        report.requeued.append(row.id)


def _forget_idempotency_keys() -> None:
    ttl = timedelta(hours=current_app.config["IDEMPOTENCY_TTL_HOURS"])
    db.session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < utcnow() - ttl))
    db.session.commit()
