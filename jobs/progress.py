"""The worker's writes to a task: the atomic claim, deferral, hand-back and fenced final writes.

(The text so far, progress and lease renewals of running attempts are written in batches by
`jobs/tracker.py`.) Every write after the claim is fenced by the attempt number and status PROCESSING, so a worker
whose task was cancelled, deleted or taken back by the sweeper changes nothing. `release`
hands a claimed task back when only its job id is known (a worker thread that died, a worker
that shuts down), fenced by that job id instead.

The database may blink: `with_database` retries a write while the connection is being
re-established, so a restart of PostgreSQL delays work instead of failing it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import NamedTuple, TypeVar

from flask import current_app
from redis.exceptions import RedisError
from sqlalchemy import bindparam, case, func, literal, select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from webapp.extensions import db
from webapp.models import Task, TaskStatus, UTCDateTime, utcnow
from webapp.queues import enqueue_task, new_job_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    """What a worker needs from the task it claimed."""

    task_id: int
    attempt: int
    max_attempts: int
    prompt: str
    model: str
    priority: int
    params: dict


def _lease(now: datetime) -> datetime:
    return now + timedelta(seconds=current_app.config["LEASE_SECONDS"])


# The writes every attempt makes (the read before the claim, the claim, the final write) are
# plain Core statements on the table, built once and run on a connection of their own: no ORM
# unit of work, and SQLAlchemy compiles each of them once per process.
_tasks = Task.__table__
_PENDING = select(
    _tasks.c.model, _tasks.c.priority, func.length(_tasks.c.prompt), _tasks.c.params, _tasks.c.user_id
).where(_tasks.c.id == bindparam("b_id"), _tasks.c.status == TaskStatus.PENDING.value)
_CLAIM = (
    update(_tasks)
    .where(_tasks.c.id == bindparam("b_id"), _tasks.c.status == TaskStatus.PENDING.value)
    .values(
        status=TaskStatus.PROCESSING.value,
        attempts=_tasks.c.attempts + 1,
        lease_expires_at=bindparam("b_lease", type_=UTCDateTime()),
        started_at=bindparam("b_now", type_=UTCDateTime()),
        progress=0,
        result=None,
        run_after=None,
        # The job that claimed it, if known (a claim by hand in tests keeps the row's).
        job_id=func.coalesce(bindparam("b_job", type_=_tasks.c.job_id.type), _tasks.c.job_id),
    )
    .returning(
        _tasks.c.attempts, _tasks.c.max_attempts, _tasks.c.prompt, _tasks.c.model, _tasks.c.priority, _tasks.c.params
    )
)
_FENCE = (
    _tasks.c.id == bindparam("b_id"),
    _tasks.c.attempts == bindparam("b_attempt"),
    _tasks.c.status == TaskStatus.PROCESSING.value,
)
_COMPLETE = (
    update(_tasks)
    .where(*_FENCE)
    .values(
        status=TaskStatus.COMPLETED.value,
        result=bindparam("b_text", type_=_tasks.c.result.type),
        progress=100,
        error=None,
        error_kind=None,
        prompt_tokens=bindparam("b_prompt_tokens", type_=_tasks.c.prompt_tokens.type),
        completion_tokens=bindparam("b_completion_tokens", type_=_tasks.c.completion_tokens.type),
        finish_reason=bindparam("b_finish_reason", type_=_tasks.c.finish_reason.type),
        lease_expires_at=None,
        finished_at=bindparam("b_now", type_=UTCDateTime()),
    )
)


def _fenced(claim: Claim):
    return update(_tasks).where(
        _tasks.c.id == claim.task_id,
        _tasks.c.attempts == claim.attempt,
        _tasks.c.status == TaskStatus.PROCESSING.value,
    )


def _run(statement, params: dict | None = None):
    """Run one statement in a transaction of its own on a pooled connection; return its rows or rowcount."""
    with db.engine.begin() as connection:
        result = connection.execute(statement, params or {})
        return result.first() if result.returns_rows else result.rowcount


def _write(statement, params: dict | None = None) -> bool:
    """Run a fenced UPDATE; return whether it hit the row."""
    return _run(statement, params) == 1


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


def claim(task_id: int, job_id: str | None = None) -> Claim | None:
    """Take a PENDING task atomically, or return None (a duplicate job, or it was cancelled).

    The row records the job that claimed it, so the task can be handed back by job id alone.
    """
    now = utcnow()
    row = _run(_CLAIM, {"b_id": task_id, "b_lease": _lease(now), "b_now": now, "b_job": job_id or None})
    if row is None:
        return None
    return Claim(task_id, row.attempts, row.max_attempts, row.prompt, row.model, row.priority, row.params or {})


def claimed_by(task_id: int, job_id: str) -> Claim | None:
    """Return the claim `job_id` holds on the task, if any.

    After a claim whose commit reply was lost (the database went away at that moment), this
    tells whether the claim went through.
    """
    row = db.session.execute(
        select(Task.attempts, Task.max_attempts, Task.prompt, Task.model, Task.priority, Task.params).where(
            Task.id == task_id, Task.status == TaskStatus.PROCESSING.value, Task.job_id == job_id
        )
    ).first()
    db.session.commit()
    if row is None:
        return None
    return Claim(task_id, row.attempts, row.max_attempts, row.prompt, row.model, row.priority, row.params or {})


class Pending(NamedTuple):
    """What a job needs to know about its PENDING task before claiming it."""

    model: str
    priority: int
    prompt_chars: int
    params: dict
    user_id: int | None = None


def pending_task(task_id: int) -> Pending | None:
    """Return a PENDING task's model, priority and size, or None when it is not PENDING (or gone)."""
    row = _run(_PENDING, {"b_id": task_id})
    return Pending(row[0], row[1], row[2] or 0, row[3] or {}, row[4]) if row else None


def reclaim(claim: Claim) -> Claim | None:
    """Start the next attempt of a task this worker holds, in place (after a short wait).

    One provider call per attempt stays true: the attempt number moves on and fences the old
    one. None when the task is no longer ours or has no attempts left.
    """
    row = db.session.execute(
        _fenced(claim)
        .where(Task.attempts < Task.max_attempts)
        .values(attempts=Task.attempts + 1, lease_expires_at=_lease(utcnow()), progress=0, result=None)
        .returning(Task.attempts)
    ).first()
    db.session.commit()
    return replace(claim, attempt=row.attempts) if row else None


def defer(task_id: int, job_id: str | None, priority: int, model: str, delay: float, timeout: int) -> str | None:
    """Move a PENDING task's run to `delay` seconds from now, without spending an attempt.

    Used when its model's circuit breaker is open, or its rpm/tpm limit is reached. Only the
    task's current job defers it (a
    duplicate job just ends); returns the new job id, or None when nothing was deferred.
    """
    fence = [Task.id == task_id, Task.status == TaskStatus.PENDING.value]
    if job_id:
        fence.append(Task.job_id == job_id)
    new_job = new_job_id(task_id)
    hit = _write(update(Task).where(*fence).values(job_id=new_job, run_after=utcnow() + timedelta(seconds=delay)))
    if not hit:
        return None
    try:
        enqueue_task(task_id, priority, timeout, delay, job_id=new_job)
    except RedisError:
        log.warning("task %s: deferred but not enqueued (Redis unavailable); the sweeper will", task_id)
    return new_job


def wake(task_id: int, timeout: int) -> bool:
    """Give a task waiting in its model's line its turn: a fresh job at the front of its queue.

    False when the task is no longer PENDING (cancelled or deleted while it waited).
    """
    new_job = new_job_id(task_id)
    row = _run(
        update(Task)
        .where(Task.id == task_id, Task.status == TaskStatus.PENDING.value)
        .values(job_id=new_job, run_after=None)
        .returning(Task.priority)
    )
    if row is None:
        return False
    try:
        enqueue_task(task_id, row.priority, timeout, job_id=new_job, at_front=True)
    except RedisError:
        log.warning("task %s: its turn came but Redis is unavailable; the sweeper will enqueue it", task_id)
    return True


def complete(
    claim: Claim,
    text: str,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    finish_reason: str | None = None,
) -> bool:
    """Record the answer and why it ended: the one final write of a successful attempt."""
    return _write(
        _COMPLETE,
        {
            "b_id": claim.task_id,
            "b_attempt": claim.attempt,
            "b_text": text,
            "b_prompt_tokens": prompt_tokens,
            "b_completion_tokens": completion_tokens,
            "b_finish_reason": finish_reason,
            "b_now": utcnow(),
        },
    )


def fail(claim: Claim, kind: str, message: str, text: str | None = None) -> bool:
    """Mark the task FAILED with a message a user can act on."""
    return _write(
        _fenced(claim).values(
            status=TaskStatus.FAILED.value,
            error=message,
            error_kind=kind,
            result=text or None,
            lease_expires_at=None,
            finished_at=utcnow(),
        )
    )


def hand_back(claim: Claim, kind: str, message: str, delay: float, job_id: str | None, refund: bool = False) -> bool:
    """Put the task back to PENDING, due after `delay` seconds, with the job that will run it.

    `refund` gives the attempt back (max_attempts + 1) when the attempt ended through no fault
    of the task or its provider, e.g. the worker shut down.
    """
    values = dict(
        status=TaskStatus.PENDING.value,
        error=message,
        error_kind=kind,
        result=None,
        progress=0,
        lease_expires_at=None,
        run_after=utcnow() + timedelta(seconds=delay),
        job_id=job_id,
    )
    if refund:
        values["max_attempts"] = _tasks.c.max_attempts + 1
    return _write(_fenced(claim).values(**values))


def release(task_id: int, job_id: str, kind: str, message: str, refund: bool) -> str | None:
    """Hand back a task that job `job_id` claimed, knowing only the ids; enqueue its next run.

    For whoever outlives an attempt: the worker after one of its threads died, or when it
    shuts down with tasks still running in threads. With `refund` the attempt is given
    back; without, a task with no attempts left is FAILED (a task that keeps killing its
    workers must end). Returns the new status, or None when the job no longer held the task.
    """
    no_attempts_left = Task.attempts >= Task.max_attempts
    next_job = new_job_id(task_id)
    now = literal(utcnow(), UTCDateTime())
    if refund:
        values = dict(
            status=TaskStatus.PENDING.value,
            max_attempts=Task.max_attempts + 1,
            result=None,
            progress=0,
            run_after=now,
            job_id=next_job,
            error=message + " It will run again.",
            error_kind=kind,
        )
    else:
        pending = TaskStatus.PENDING.value
        values = dict(
            status=case((no_attempts_left, TaskStatus.FAILED.value), else_=pending),
            finished_at=case((no_attempts_left, now), else_=None),
            result=case((no_attempts_left, Task.result), else_=None),
            progress=case((no_attempts_left, Task.progress), else_=0),
            run_after=case((no_attempts_left, None), else_=now),
            job_id=case((no_attempts_left, Task.job_id), else_=next_job),
            error=case(
                (no_attempts_left, message + " No attempts are left; retry the task."),
                else_=message + " It will run again.",
            ),
            error_kind=kind,
        )
    row = db.session.execute(
        update(Task)
        .where(Task.id == task_id, Task.status == TaskStatus.PROCESSING.value, Task.job_id == job_id)
        .values(lease_expires_at=None, **values)
        .returning(Task.status, Task.priority, Task.model)
    ).first()
    db.session.commit()
    if row is None:
        # Maybe the job never got as far as its claim: then the task waits for it, PENDING.
        row = db.session.execute(
            update(Task)
            .where(Task.id == task_id, Task.status == TaskStatus.PENDING.value, Task.job_id == job_id)
            .values(job_id=next_job)
            .returning(Task.status, Task.priority, Task.model)
        ).first()
        db.session.commit()
    if row is None:
        return None
    if row.status == TaskStatus.PENDING.value:
        from webapp.services.tasks import job_timeout

        try:
            enqueue_task(task_id, row.priority, job_timeout(row.model), job_id=next_job)
        except RedisError:
            log.warning("task %s handed back but not enqueued (Redis unavailable); the sweeper will", task_id)
    return row.status
