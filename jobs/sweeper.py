"""The sweeper: PostgreSQL is the record, so every unfinished task must have a way forward.

- a PROCESSING task whose lease expired (its worker died) goes back to PENDING, or to FAILED
  when it has no attempts left;
- a PENDING task that no queue holds (Redis lost its data, a worker died between taking a job
  and claiming its task, the process died between commit and enqueue) is enqueued again;
- a delayed job (a retry's backoff, a deferral) still waiting more than SCHEDULER_SLACK after
  its time is moved onto its queue. RQ's scheduler, running in one worker at a time, does that
  every second; but a worker killed while running it keeps RQ's scheduler lock for a minute,
  and the other workers look for the lock only once a minute, so without this pass every
  deferred task would wait up to two minutes;
- a model whose slots expired (a dead worker's calls) while tasks wait in its line hands them
  to the line; the tasks in a line are held there and are not enqueued again.

"Held" is read from RQ's own structures, all at once per pass: the queue lists and the
scheduled registries. A job's status field is not enough: a worker killed right after popping
a job leaves it `queued` (or `started`) for minutes, in no queue. A job that was popped and is
about to claim its task (milliseconds) may be duplicated by a pass; the claim makes that
harmless.

Several sweepers may run (one per scheduler); a PostgreSQL advisory lock lets one pass run at a
time (a Redis lock on SQLite, where there is one process anyway). Every write is fenced, and
duplicate jobs are harmless (the claim lets only one of them run), so a pass that overlaps a
worker changes nothing it should not.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta

from flask import current_app
from redis import Redis
from redis.exceptions import RedisError
from rq.registry import ScheduledJobRegistry
from rq.serializers import JSONSerializer
from sqlalchemy import delete, func, or_, select
from sqlalchemy.exc import DBAPIError

from webapp.catalog import ModelSpec, catalog
from webapp.extensions import db
from webapp.lifecycle import attempts, job_timeout
from webapp.models import IdempotencyKey, Task, TaskStatus, utcnow
from webapp.queues import QUEUE_NAMES, enqueue_task, forget_dead_workers, get_queue, redis

from .limits import model_limits
from .outage import database_unavailable
from .run_task import wake

log = logging.getLogger(__name__)

LOCK_KEY = "atr:sweeper:lock"
# pg_try_advisory_lock key: any constant the application does not use elsewhere.
ADVISORY_LOCK = 0x41545253  # "ATRS"
BATCH = 1000
# RQ's scheduler moves due jobs every second: one this late has no live scheduler.
SCHEDULER_SLACK = 5.0


@dataclass
class SweepReport:
    requeued: list[int] = field(default_factory=list)
    overdue: list[str] = field(default_factory=list)
    woken: list[int] = field(default_factory=list)
    reclaimed: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    skipped: bool = False

    def __str__(self) -> str:
        if self.skipped:
            return "sweep skipped: another sweeper holds the lock"
        return (
            f"sweep: {len(self.requeued)} re-enqueued, {len(self.reclaimed)} taken back from dead "
            f"workers, {len(self.failed)} failed with no attempts left, {len(self.overdue)} overdue delayed "
            f"jobs moved to their queues, {len(self.woken)} waiting tasks given expired slots"
        )


class _Outage:
    """Leases run out for everyone while the database is away: no one could renew them.

    So after an outage the sweeper gives live workers two leases' time to renew before it
    takes anything back; otherwise every task running through a database restart would be
    run again.
    """

    down = False
    hold_until = 0.0


def sweep() -> SweepReport:
    """Run one pass, unless another process is sweeping right now."""
    try:
        with _lock() as acquired:
            if _Outage.down:
                _Outage.down = False
                _Outage.hold_until = time.monotonic() + 2 * current_app.config["LEASE_SECONDS"]
                log.info("sweeper: the database is back; leases are not taken back for a while")
            if not acquired:
                return SweepReport(skipped=True)
            report = SweepReport()
            if time.monotonic() >= _Outage.hold_until:
                _take_back_expired(report)
            _release_overdue(report)
            _pump_lines(report)
            _requeue_orphans(report)
            _forget_idempotency_keys()
            _forget_dead_workers()
            if report.requeued or report.reclaimed or report.failed or report.overdue or report.woken:
                log.info("%s", report)
            return report
    except DBAPIError as exc:
        if database_unavailable(exc):
            _Outage.down = True
        raise


@contextlib.contextmanager
def _lock() -> Iterator[bool]:
    """Hold the sweeper lock for one pass; yield whether we got it."""
    if db.engine.dialect.name == "postgresql":
        # A session lock on a connection of its own: released when the pass ends, or by
        # PostgreSQL itself if this process dies. Works while Redis is down.
        with db.engine.connect() as connection:
            acquired = connection.scalar(select(func.pg_try_advisory_lock(ADVISORY_LOCK)))
            try:
                yield bool(acquired)
            finally:
                if acquired:
                    with contextlib.suppress(Exception):
                        connection.scalar(select(func.pg_advisory_unlock(ADVISORY_LOCK)))
                connection.rollback()
        return
    connection = redis()
    token = secrets.token_hex(8)
    ttl = max(60, int(current_app.config["SWEEP_INTERVAL"]) * 2)
    acquired = bool(connection.set(LOCK_KEY, token, nx=True, ex=ttl))
    try:
        yield acquired
    finally:
        if acquired:
            # Release only our own lock (it may have expired and been taken by another sweeper).
            connection.eval(
                "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0",
                1,
                LOCK_KEY,
                token,
            )


def _take_back_expired(report: SweepReport) -> None:
    now = utcnow()
    after = 0
    while True:
        expired = db.session.execute(
            select(Task.id, Task.attempts)
            .where(Task.status == TaskStatus.PROCESSING.value, Task.lease_expires_at < now, Task.id > after)
            .order_by(Task.id)
            .limit(BATCH)
        ).all()
        db.session.commit()
        if not expired:
            return
        after = expired[-1].id
        for task_id, attempt in expired:
            status = attempts.take_back(task_id, attempt, now)
            if status is not None:
                (report.failed if status == TaskStatus.FAILED.value else report.reclaimed).append(task_id)
    # The reclaimed tasks are PENDING with no job now: the orphan pass enqueues them.


def _release_overdue(report: SweepReport) -> None:
    """Move delayed jobs more than SCHEDULER_SLACK past their time onto their queues.

    Taking a job out of the scheduled registry is the claim on it: if RQ's scheduler (or another
    sweeper) moved it first, the ZREM finds nothing and the job is left alone.
    """
    connection = redis()
    try:
        for name in QUEUE_NAMES:
            queue = get_queue(name, connection)
            registry = ScheduledJobRegistry(queue=queue, serializer=JSONSerializer)
            for job_id in registry.get_jobs_to_schedule(int(time.time() - SCHEDULER_SLACK)):
                if not connection.zrem(registry.key, job_id):
                    continue
                job = queue.fetch_job(job_id)
                if job is not None:  # else the job expired: the orphan pass enqueues its task again
                    queue.enqueue_job(job)
                    report.overdue.append(job_id)
    except RedisError:
        log.warning("sweeper: Redis unavailable; will retry next pass")


def _limited() -> list[ModelSpec]:
    return [spec for spec in catalog() if spec.concurrency]


def _pump_lines(report: SweepReport) -> None:
    """Hand slots that expired (their worker died) to the tasks waiting in line for them."""
    try:
        for spec in _limited():
            woken = model_limits().pump(spec)
            wake(spec, woken)
            report.woken.extend(woken)
    except RedisError:
        log.warning("sweeper: Redis unavailable; will retry next pass")


def held_job_ids(connection: Redis) -> set[str]:
    """Return the ids of every job waiting in RQ: on a queue, or scheduled for later."""
    held: set[str] = set()
    for name in QUEUE_NAMES:
        queue = get_queue(name, connection)
        held.update(queue.get_job_ids())
        held.update(ScheduledJobRegistry(queue=queue, serializer=JSONSerializer).get_job_ids(cleanup=False))
    return held


def _requeue_orphans(report: SweepReport) -> None:
    now = utcnow()
    grace = now - timedelta(seconds=current_app.config["SWEEP_GRACE_SECONDS"])
    connection = redis()
    held: set[str] | None = None
    in_line: set[int] = set()
    after = 0
    while True:
        candidates = db.session.execute(
            select(Task.id, Task.priority, Task.model, Task.job_id, Task.run_after, Task.created_at)
            .where(
                Task.status == TaskStatus.PENDING.value,
                or_(Task.job_id.is_(None), Task.updated_at < grace),
                Task.id > after,
            )
            .order_by(Task.id)
            .limit(BATCH)
        ).all()
        db.session.commit()
        if not candidates:
            return
        after = candidates[-1].id
        if held is None:
            try:
                held = held_job_ids(connection)
                in_line = model_limits().waiting([spec.name for spec in _limited()])
            except RedisError:
                log.warning("sweeper: Redis unavailable; will retry next pass")
                return
        for row in candidates:
            if (row.job_id and row.job_id in held) or row.id in in_line:
                continue
            if row.job_id is None and row.run_after is None and row.created_at >= grace:
                continue  # submitted a moment ago; its enqueue may still be under way
            delay = max(0.0, (row.run_after - now).total_seconds()) if row.run_after else 0.0
            try:
                job_id = enqueue_task(row.id, row.priority, job_timeout(row.model), delay)
            except RedisError:
                log.warning("sweeper: Redis unavailable; will retry next pass")
                return
            if attempts.requeue(row.id, row.job_id, job_id):
                report.requeued.append(row.id)


def _forget_dead_workers() -> None:
    """Unregister workers that died without saying so: health, /admin and rq-dashboard list the living."""
    try:
        if names := forget_dead_workers(redis()):
            log.info("sweeper: unregistered %d silent workers: %s", len(names), ", ".join(names))
    except RedisError:
        pass  # the passes that need Redis have said so already


def _forget_idempotency_keys() -> None:
    ttl = timedelta(hours=current_app.config["IDEMPOTENCY_TTL_HOURS"])
    db.session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < utcnow() - ttl))
    db.session.commit()
