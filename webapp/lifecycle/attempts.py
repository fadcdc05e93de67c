"""An attempt's status changes: claim, reclaim, complete, fail, hand back, release, take back, defer, wake.

Workers (`jobs/run_task.py`, `jobs/worker.py`) and the sweeper call these. Each is one fenced
statement in a transaction of its own, so a worker whose task was cancelled, deleted or taken
back changes nothing:

- claim: PENDING -> PROCESSING (attempts + 1), fenced by status PENDING;
- reclaim: the next attempt in place (PROCESSING, attempts + 1), fenced by the attempt;
- complete / fail: PROCESSING -> COMPLETED / FAILED, fenced by the attempt;
- hand_back: PROCESSING -> PENDING with the job that runs it next, fenced by the attempt;
- release: PROCESSING -> PENDING (or FAILED, no attempts left), fenced by the job id, for
  whoever outlives an attempt (the worker, after a thread died or at shutdown);
- take_back: PROCESSING -> PENDING (or FAILED) once the lease expired (the sweeper);
- defer: PENDING stays PENDING, due later (circuit open, rpm/tpm limit reached);
- wake: PENDING, waiting in its model's line, gets a job at the front of its queue.

(The text so far, progress and lease renewals of running attempts are written in batches by
`jobs/tracker.py`, fenced the same way.) The transitions that finish a task call
`hooks._finished` in their transaction. The callers wrap these in `jobs.outage.with_database`,
so a database restart delays an attempt instead of failing it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import NamedTuple

from flask import current_app
from sqlalchemy import bindparam, case, func, insert, literal, select, update

from ..catalog import catalog
from ..extensions import db
from ..models import Task, TaskAttempt, TaskStatus, UTCDateTime, utcnow
from ..queues import new_job_id
from .hooks import _changed
from .queueing import enqueue

# What a user reads when a worker went away (said once, whoever noticed).
WORKER_LOST = "The worker running this task stopped responding."
THREAD_DIED = "The worker thread running this task died."
SHUT_DOWN = "The worker running this task shut down."
RUNS_AGAIN = " It will run again."
NO_ATTEMPTS_LEFT = " No attempts are left; retry the task."


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
    # `model` is the model of its fallback chain the task runs on now; `asked` the one the user
    # asked for (the head of that chain).
    asked: str = ""

    @property
    def chain_head(self) -> str:
        return self.asked or self.model


class Pending(NamedTuple):
    """What a job needs to know about its PENDING task before claiming it."""

    # The model it runs on now, and the one asked for (they differ after a fallback).
    model: str
    priority: int
    prompt_chars: int
    params: dict
    asked: str = ""
    user_id: int | None = None  # whose turn it is in a model's fair-share line


@dataclass(frozen=True)
class Note:
    """A provider call that did not answer, for the task's attempt history (`task_attempts`)."""

    model: str
    kind: str
    detail: str
    fell_back: bool = False


def _lease(now: datetime) -> datetime:
    return now + timedelta(seconds=current_app.config["LEASE_SECONDS"])


# The writes every attempt makes (the read before the claim, the claim, the final write) are
# plain Core statements on the table, built once and run on a connection of their own: no ORM
# unit of work, and SQLAlchemy compiles each of them once per process.
_tasks = Task.__table__
_attempts = TaskAttempt.__table__
# The model a task runs on now: the one asked for until it falls back (`fall_back`).
_runs_on = func.coalesce(_tasks.c.active_model, _tasks.c.model)
_PENDING = select(
    _runs_on, _tasks.c.priority, func.length(_tasks.c.prompt), _tasks.c.params, _tasks.c.model, _tasks.c.user_id
).where(_tasks.c.id == bindparam("b_id"), _tasks.c.status == TaskStatus.PENDING.value)
_CLAIMED = (
    _tasks.c.attempts,
    _tasks.c.max_attempts,
    _tasks.c.prompt,
    _runs_on.label("runs_on"),
    _tasks.c.priority,
    _tasks.c.params,
    _tasks.c.model,
)
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
    .returning(*_CLAIMED)
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
        # The model that answered and its prices now: a later price change rewrites nothing.
        served_by=bindparam("b_served_by", type_=_tasks.c.served_by.type),
        usd_per_million_input_tokens=bindparam("b_price_in", type_=_tasks.c.usd_per_million_input_tokens.type),
        usd_per_million_output_tokens=bindparam("b_price_out", type_=_tasks.c.usd_per_million_output_tokens.type),
        cost_usd=bindparam("b_cost", type_=_tasks.c.cost_usd.type),
        lease_expires_at=None,
        finished_at=bindparam("b_now", type_=UTCDateTime()),
    )
    .returning(*_tasks.c)
)


def _fenced(claim: Claim):
    return update(_tasks).where(
        _tasks.c.id == claim.task_id,
        _tasks.c.attempts == claim.attempt,
        _tasks.c.status == TaskStatus.PROCESSING.value,
    )


def _first(statement, params: dict | None = None):
    """Run one statement in a transaction of its own on a pooled connection; return its first row."""
    with db.engine.begin() as connection:
        return connection.execute(statement, params or {}).first()


def _finishing(statement, params: dict | None = None, claim: Claim | None = None, note: Note | None = None) -> bool:
    """Run a fenced UPDATE … RETURNING every column that may finish the task; return whether it hit.

    The finished row goes to `hooks._finished` in the same transaction (`hooks._changed`), and
    so does the `note` on the claim's attempt, if any.
    """
    with db.engine.begin() as connection:
        hit = bool(_changed(connection, statement, params))
        if hit and note is not None and claim is not None:
            _note(connection, claim.task_id, claim.attempt, note)
    return hit


def _note(connection, task_id: int, attempt: int, note: Note) -> None:
    """Add a failed call to the task's attempt history, in the caller's transaction."""
    connection.execute(
        insert(_attempts).values(
            task_id=task_id,
            attempt=attempt,
            model=note.model,
            kind=note.kind,
            detail=note.detail[:200],
            fell_back=note.fell_back,
            created_at=utcnow(),
        )
    )


def _claim_of(task_id: int, row) -> Claim:
    return Claim(
        task_id, row.attempts, row.max_attempts, row.prompt, row.runs_on, row.priority, row.params or {}, row.model
    )


def pending_task(task_id: int) -> Pending | None:
    """Return a PENDING task's model, priority and size, or None when it is not PENDING (or gone)."""
    row = _first(_PENDING, {"b_id": task_id})
    return Pending(row[0], row[1], row[2] or 0, row[3] or {}, row[4], row[5]) if row else None


def prompt_of(task_id: int) -> str | None:
    """Return a task's prompt (to check it against a model's context window before claiming it)."""
    row = _first(select(_tasks.c.prompt).where(_tasks.c.id == task_id))
    return row.prompt if row else None


def claim(task_id: int, job_id: str | None = None) -> Claim | None:
    """Take a PENDING task atomically, or return None (a duplicate job, or it was cancelled).

    The row records the job that claimed it, so the task can be handed back by job id alone.
    """
    now = utcnow()
    row = _first(_CLAIM, {"b_id": task_id, "b_lease": _lease(now), "b_now": now, "b_job": job_id or None})
    return None if row is None else _claim_of(task_id, row)


def claimed_by(task_id: int, job_id: str) -> Claim | None:
    """Return the claim `job_id` holds on the task, if any.

    After a claim whose commit reply was lost (the database went away at that moment), this
    tells whether the claim went through.
    """
    row = _first(
        select(*_CLAIMED).where(
            _tasks.c.id == task_id, _tasks.c.status == TaskStatus.PROCESSING.value, _tasks.c.job_id == job_id
        )
    )
    return None if row is None else _claim_of(task_id, row)


def reclaim(claim: Claim, note: Note | None = None) -> Claim | None:
    """Start the next attempt of a task this worker holds, in place (after a short wait).

    One provider call per attempt stays true: the attempt number moves on and fences the old
    one (whose failure `note` records). None when the task is no longer ours or has no
    attempts left.
    """
    with db.engine.begin() as connection:
        row = connection.execute(
            _fenced(claim)
            .where(_tasks.c.attempts < _tasks.c.max_attempts)
            .values(attempts=_tasks.c.attempts + 1, lease_expires_at=_lease(utcnow()), progress=0, result=None)
            .returning(_tasks.c.attempts)
        ).first()
        if row is not None and note is not None:
            _note(connection, claim.task_id, claim.attempt, note)
    return replace(claim, attempt=row.attempts) if row else None


def fall_back(
    task_id: int, runs_on: str, to: str, note: Note, attempt: int | None = None, job_id: str | None = None
) -> bool:
    """Move a task on from `runs_on` to the next model of its chain, `to`; return whether it moved.

    Not a failure: the task goes (or stays) PENDING with no error, the new model gets a fresh
    share of attempts (TASK_MAX_ATTEMPTS), and `note` says why in the attempt history. Fenced
    by the attempt when the task is claimed (`attempt`: it gets a new job, enqueued after the
    commit at the front of its queue), else by its PENDING status and job (the caller's job
    goes on with it). False when the fence missed (cancelled, deleted, taken back). Its
    reservation stays: it was priced at the dearest model of the chain.
    """
    share = current_app.config["TASK_MAX_ATTEMPTS"]
    fence = [_tasks.c.id == task_id, runs_on == _runs_on]
    values = dict(
        active_model=to,
        status=TaskStatus.PENDING.value,
        error=None,
        error_kind=None,
        result=None,
        progress=0,
        lease_expires_at=None,
        run_after=None,
        max_attempts=_tasks.c.attempts + share,
    )
    if attempt is not None:
        fence += [_tasks.c.attempts == attempt, _tasks.c.status == TaskStatus.PROCESSING.value]
        next_job = values["job_id"] = new_job_id(task_id)
    else:
        fence.append(_tasks.c.status == TaskStatus.PENDING.value)
        if job_id:
            fence.append(_tasks.c.job_id == job_id)
    with db.engine.begin() as connection:
        row = connection.execute(
            update(_tasks).where(*fence).values(**values).returning(_tasks.c.attempts, _tasks.c.priority)
        ).first()
        if row is None:
            return False
        _note(connection, task_id, row.attempts, replace(note, model=runs_on, fell_back=True))
    if attempt is not None:
        enqueue(task_id, row.priority, to, job_id=next_job, at_front=True, why="moved on to its next model")
    return True


def complete(
    claim: Claim,
    text: str,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    finish_reason: str | None = None,
) -> bool:
    """Record the answer and why it ended: the one final write of a successful attempt.

    The answer is priced at the catalog's prices of the model that answered (`claim.model`).
    """
    spec = catalog().get(claim.model)
    return _finishing(
        _COMPLETE,
        {
            "b_id": claim.task_id,
            "b_attempt": claim.attempt,
            "b_text": text,
            "b_prompt_tokens": prompt_tokens,
            "b_completion_tokens": completion_tokens,
            "b_finish_reason": finish_reason,
            "b_served_by": claim.model,
            "b_price_in": spec.usd_per_million_input_tokens if spec else None,
            "b_price_out": spec.usd_per_million_output_tokens if spec else None,
            "b_cost": spec.cost(prompt_tokens, completion_tokens) if spec else None,
            "b_now": utcnow(),
        },
    )


def completed_by(claim: Claim) -> bool:
    """Return whether this attempt's answer is recorded (after a commit whose reply was lost)."""
    row = _first(select(_tasks.c.status, _tasks.c.attempts).where(_tasks.c.id == claim.task_id))
    return row is not None and row.status == TaskStatus.COMPLETED.value and row.attempts == claim.attempt


def fail(claim: Claim, kind: str, message: str, text: str | None = None, note: Note | None = None) -> bool:
    """Mark the task FAILED with a message a user can act on."""
    return _finishing(
        _fenced(claim)
        .values(
            status=TaskStatus.FAILED.value,
            error=message,
            error_kind=kind,
            result=text or None,
            lease_expires_at=None,
            finished_at=utcnow(),
        )
        .returning(*_tasks.c),
        claim=claim,
        note=note,
    )


def hand_back(
    claim: Claim,
    kind: str,
    message: str,
    delay: float,
    job_id: str | None,
    refund: bool = False,
    note: Note | None = None,
) -> bool:
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
    with db.engine.begin() as connection:
        row = connection.execute(_fenced(claim).values(**values).returning(_tasks.c.id)).first()
        if row is not None and note is not None:
            _note(connection, claim.task_id, claim.attempt, note)
    return row is not None


def _back_or_failed(no_attempts_left, reason: str, now, next_job) -> dict:
    """The values of a task taken back from a lost attempt: PENDING again, or FAILED with no attempts left."""
    return dict(
        status=case((no_attempts_left, TaskStatus.FAILED.value), else_=TaskStatus.PENDING.value),
        finished_at=case((no_attempts_left, now), else_=None),
        result=case((no_attempts_left, _tasks.c.result), else_=None),
        progress=case((no_attempts_left, _tasks.c.progress), else_=0),
        run_after=case((no_attempts_left, None), else_=now),
        job_id=case((no_attempts_left, _tasks.c.job_id), else_=next_job),
        error=case((no_attempts_left, reason + NO_ATTEMPTS_LEFT), else_=reason + RUNS_AGAIN),
        lease_expires_at=None,
    )


def release(task_id: int, job_id: str, kind: str, reason: str, refund: bool) -> str | None:
    """Hand back a task that job `job_id` claimed, knowing only the ids; enqueue its next run.

    For whoever outlives an attempt: the worker after one of its threads died, or when it
    shuts down with tasks still running in threads. With `refund` the attempt is given
    back; without, a task with no attempts left is FAILED (a task that keeps killing its
    workers must end). Returns the new status, or None when the job no longer held the task.
    """
    next_job = new_job_id(task_id)
    now = literal(utcnow(), UTCDateTime())
    if refund:
        values = dict(
            status=TaskStatus.PENDING.value,
            max_attempts=_tasks.c.max_attempts + 1,
            result=None,
            progress=0,
            run_after=now,
            job_id=next_job,
            error=reason + RUNS_AGAIN,
            lease_expires_at=None,
        )
    else:
        values = _back_or_failed(_tasks.c.attempts >= _tasks.c.max_attempts, reason, now, next_job)
    mine = (_tasks.c.id == task_id, _tasks.c.job_id == job_id)
    with db.engine.begin() as connection:
        rows = _changed(
            connection,
            update(_tasks)
            .where(*mine, _tasks.c.status == TaskStatus.PROCESSING.value)
            .values(error_kind=kind, **values)
            .returning(*_tasks.c),
        )
        if not rows:
            # Maybe the job never got as far as its claim: then the task waits for it, PENDING.
            rows = (
                connection.execute(
                    update(_tasks)
                    .where(*mine, _tasks.c.status == TaskStatus.PENDING.value)
                    .values(job_id=next_job)
                    .returning(_tasks.c.status, _tasks.c.priority, _tasks.c.model)
                )
                .mappings()
                .all()
            )
    if not rows:
        return None
    row = rows[0]
    if row["status"] == TaskStatus.PENDING.value:
        enqueue(task_id, row["priority"], row["model"], job_id=next_job, why="handed back")
    return row["status"]


def take_back(task_id: int, attempt: int, now: datetime) -> str | None:
    """Take back a PROCESSING task whose lease expired before `now` (its worker died).

    PENDING again, with no job (the sweeper's orphan pass enqueues it), or FAILED when it has no
    attempts left. Fenced like a worker's write: nothing happens if the attempt renewed its
    lease or finished meanwhile. Returns the new status, or None.
    """
    at = literal(now, UTCDateTime())
    values = _back_or_failed(_tasks.c.attempts >= _tasks.c.max_attempts, WORKER_LOST, at, None)
    fence = (
        _tasks.c.id == task_id,
        _tasks.c.attempts == attempt,
        _tasks.c.status == TaskStatus.PROCESSING.value,
        _tasks.c.lease_expires_at < now,
    )
    statement = update(_tasks).where(*fence).values(error_kind="worker_lost", **values).returning(*_tasks.c)
    with db.engine.begin() as connection:
        rows = _changed(connection, statement)
    return rows[0]["status"] if rows else None


def defer(task_id: int, job_id: str | None, priority: int, model: str, delay: float) -> str | None:
    """Move a PENDING task's run to `delay` seconds from now, without spending an attempt.

    Used when its model's circuit breaker is open, or its rpm/tpm limit is reached. Only the
    task's current job defers it (a duplicate job just ends); returns the new job id, or None
    when nothing was deferred.
    """
    fence = [_tasks.c.id == task_id, _tasks.c.status == TaskStatus.PENDING.value]
    if job_id:
        fence.append(_tasks.c.job_id == job_id)
    new_job = new_job_id(task_id)
    due = utcnow() + timedelta(seconds=delay)
    if _first(update(_tasks).where(*fence).values(job_id=new_job, run_after=due).returning(_tasks.c.id)) is None:
        return None
    enqueue(task_id, priority, model, delay, job_id=new_job, why="deferred")
    return new_job


def wake(task_id: int) -> bool:
    """Give a task waiting in its model's line its turn: a fresh job at the front of its queue.

    False when the task is no longer PENDING (cancelled or deleted while it waited).
    """
    new_job = new_job_id(task_id)
    row = _first(
        update(_tasks)
        .where(_tasks.c.id == task_id, _tasks.c.status == TaskStatus.PENDING.value)
        .values(job_id=new_job, run_after=None)
        .returning(_tasks.c.priority, _tasks.c.model)
    )
    if row is None:
        return False
    enqueue(task_id, row.priority, row.model, job_id=new_job, at_front=True, why="given its turn")
    return True


def requeue(task_id: int, old_job: str | None, new_job: str) -> bool:
    """Record the job the sweeper enqueued for a PENDING task no queue held; fenced on the job it replaces.

    A worker that handed the task back meanwhile (a new job id) wins.
    """
    fence = _tasks.c.job_id.is_(None) if old_job is None else _tasks.c.job_id == old_job
    statement = (
        update(_tasks)
        .where(_tasks.c.id == task_id, _tasks.c.status == TaskStatus.PENDING.value, fence)
        .values(job_id=new_job)
        .returning(_tasks.c.id)
    )
    return _first(statement) is not None
