"""What people do to tasks: submit, cancel, reopen (retry), delete; one task or many at once.

`services/tasks.py` (a user, one task) and `services/admin.py` (an admin, by filter) both call
these; the services check who may do what and the limits, this module writes. Each change is
one fenced statement: cancel only what is unfinished, reopen only what is FAILED or CANCELLED.
Jobs are enqueued, or dropped, after the commit.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

from flask import current_app
from sqlalchemy import Connection, RowMapping, bindparam, delete, text, update
from sqlalchemy.orm import make_transient_to_detached

from .. import metrics
from ..extensions import db
from ..models import UNFINISHED, IdempotencyKey, Task, TaskStatus, User, sql_in, utcnow
from ..queues import new_job_id
from .hooks import _accepted, _changed, _removed, _reopened
from .queueing import drop_job, enqueue

_tasks = Task.__table__
REOPENABLE = (TaskStatus.FAILED.value, TaskStatus.CANCELLED.value)
# What the owner reads on a cancelled task, by who cancelled it.
CANCELLED_BY = {"user": "Cancelled by the user.", "admin": "Cancelled by an administrator."}


# A submission is one statement on PostgreSQL: the id comes from the sequence in the same
# statement, so the row names its job ("task-<id>-<suffix>") from the start with no second write,
# and the user's in-flight cap (MAX_TASKS_IN_FLIGHT, counted through the (user_id, status, id)
# index, never past the cap) guards the insert: no row back means the user is at the cap.
# Compiled once, here.
_UNFINISHED = sql_in(UNFINISHED)
_SUBMIT_PG = (
    text(
        "WITH new AS (SELECT nextval(pg_get_serial_sequence('tasks', 'id')) AS id)"
        " INSERT INTO tasks (id, user_id, prompt, model, priority, params, status, progress, attempts,"
        " max_attempts, reserved_usd, reserved_month, job_id, created_at, updated_at)"
        " SELECT new.id, :user_id, :prompt, :model, :priority, :params, :status, 0, 0, :max_attempts,"
        " :reserved_usd, :reserved_month, 'task-' || new.id || '-' || :job_suffix, :now, :now FROM new"
        " WHERE :cap <= 0 OR (SELECT count(*) FROM (SELECT 1 FROM tasks WHERE user_id = :user_id"
        f" AND status IN {_UNFINISHED}"
        " LIMIT :cap) AS unfinished) < :cap"
        " RETURNING " + ", ".join(column.name for column in _tasks.c)
    )
    .bindparams(
        bindparam("params", type_=_tasks.c.params.type),
        bindparam("reserved_usd", type_=_tasks.c.reserved_usd.type),
        bindparam("now", type_=_tasks.c.created_at.type),
    )
    .columns(*_tasks.c)
)
# A user's unfinished tasks, counted the same way (the retry path and SQLite's submit).
IN_FLIGHT = text(
    f"SELECT count(*) FROM (SELECT 1 FROM tasks WHERE user_id = :user_id AND status IN {_UNFINISHED} LIMIT :cap)"
    " AS unfinished"
)


class AtCapacityError(Exception):
    """The user already has `in_flight_cap` unfinished tasks: nothing was written."""


def submit(
    user: User,
    prompt: str,
    model: str,
    priority: int,
    params: dict,
    idempotency: tuple[str, str] | None = None,
    in_flight_cap: int = 0,
    admit: Callable[[], None] | None = None,
) -> Task:
    """Insert a task PENDING, naming its job; commit; enqueue it. Return the task.

    `idempotency` is (key, request hash): the key is recorded in the same transaction. An
    IntegrityError (another request with the same key won) comes back rolled back.
    With `in_flight_cap` > 0 the insert happens only while the user has fewer unfinished tasks
    (AtCapacityError otherwise). `admit` runs after the insert, before the commit: raising
    refuses the submission (e.g. a per-minute limit counted only for submissions that fit).
    """
    suffix = secrets.token_hex(4)
    values = {
        "user_id": user.id,
        "prompt": prompt,
        "model": model,
        "priority": priority,
        "params": params,
        "status": TaskStatus.PENDING.value,
        "max_attempts": current_app.config["TASK_MAX_ATTEMPTS"],
        "reserved_usd": None,
        "reserved_month": None,
    }
    try:
        connection = db.session.connection()
        _accepted(connection, user, values)
        if connection.dialect.name == "postgresql":
            row = (
                connection.execute(_SUBMIT_PG, {**values, "job_suffix": suffix, "now": utcnow(), "cap": in_flight_cap})
                .mappings()
                .first()
            )
            if row is None:
                raise AtCapacityError(in_flight_cap)
            task = _persistent(row)
        else:
            task = _insert_orm(user, values, suffix, in_flight_cap)
        if idempotency:
            key, request_hash = idempotency
            db.session.add(IdempotencyKey(user_id=user.id, key=key, request_hash=request_hash, task_id=task.id))
        if admit is not None:
            admit()
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise
    enqueue(task.id, task.priority, task.model, job_id=task.job_id, also=metrics.Batch().submitted(model))
    return task


def _persistent(row: RowMapping) -> Task:
    """Return the task of a row just inserted, as a loaded object of this session (no query)."""
    task = Task(**row)
    make_transient_to_detached(task)
    db.session.add(task)
    return task


def _insert_orm(user: User, values: dict, suffix: str, in_flight_cap: int) -> Task:
    """The same insert on SQLite (the embedded set-up): count, insert, then name the job."""
    if in_flight_cap > 0:
        counted = db.session.execute(IN_FLIGHT, {"user_id": user.id, "cap": in_flight_cap}).scalar_one()
        if counted >= in_flight_cap:
            raise AtCapacityError(in_flight_cap)
    task = Task(**values)
    db.session.add(task)
    db.session.flush()  # assigns the id, in the same transaction
    task.job_id = f"task-{task.id}-{suffix}"
    return task


def cancel_rows(connection: Connection, where: Sequence, by: str) -> list[RowMapping]:
    """Cancel the unfinished tasks matching `where` in the caller's transaction; return their rows.

    The caller commits, then drops their jobs (`drop_jobs`). For a change that cancels tasks
    with something else (a batch), in one transaction.
    """
    statement = (
        update(_tasks)
        .where(_tasks.c.status.in_(UNFINISHED), *where)
        .values(
            status=TaskStatus.CANCELLED.value,
            error=CANCELLED_BY[by],
            error_kind="cancelled",
            lease_expires_at=None,
            finished_at=utcnow(),
        )
        .returning(*_tasks.c)
    )
    rows = _changed(connection, statement)
    return rows


def drop_jobs(rows: Sequence[RowMapping]) -> None:
    """After the commit: take the jobs of cancelled tasks out of their queues (a running worker
    notices at its next write)."""
    for row in rows:
        drop_job(row["job_id"])


def cancel(where: Sequence, by: str) -> list[RowMapping]:
    """Cancel the PENDING or PROCESSING tasks matching `where` (by "user" or "admin"); return their rows."""
    rows = cancel_rows(db.session.connection(), where, by)
    db.session.commit()
    drop_jobs(rows)
    return rows


def reopen(where: Sequence) -> int:
    """Run the FAILED or CANCELLED tasks matching `where` again, each with a fresh set of attempts
    and a new job; return how many."""
    connection = db.session.connection()
    statement = (
        update(_tasks)
        .where(_tasks.c.status.in_(REOPENABLE), *where)
        .values(
            status=TaskStatus.PENDING.value,
            progress=0,
            result=None,
            error=None,
            error_kind=None,
            prompt_tokens=None,
            completion_tokens=None,
            finish_reason=None,
            started_at=None,
            finished_at=None,
            run_after=None,
            # Attempts keep counting (they fence stale workers); the budget moves up instead.
            max_attempts=_tasks.c.attempts + current_app.config["TASK_MAX_ATTEMPTS"],
            # It starts again from the model asked for, the head of its fallback chain.
            active_model=None,
        )
        .returning(*_tasks.c)
    )
    rows = _changed(connection, statement)
    jobs = {row["id"]: new_job_id(row["id"]) for row in rows}
    if jobs:
        # In the same transaction: each reopened row names its new job from the start.
        db.session.execute(update(Task), [{"id": task_id, "job_id": job_id} for task_id, job_id in jobs.items()])
        try:
            _reopened(connection, rows)
        except BaseException:
            db.session.rollback()  # e.g. over budget: none of them is reopened
            raise
    db.session.commit()
    for row in rows:
        enqueue(row["id"], row["priority"], row["model"], job_id=jobs[row["id"]], why="reopened")
    return len(rows)


def delete_tasks(where: Sequence) -> list[RowMapping]:
    """Delete the tasks matching `where`, cancelling the unfinished ones' jobs; return their rows."""
    connection = db.session.connection()
    rows = connection.execute(delete(_tasks).where(*where).returning(*_tasks.c)).mappings().all()
    _removed(connection, rows)
    db.session.commit()
    drop_jobs([row for row in rows if row["status"] in UNFINISHED])
    return rows
