"""What people do to tasks: submit, cancel, reopen (retry), delete; one task or many at once.

`services/tasks.py` (a user, one task) and `services/admin.py` (an admin, by filter) both call
these; the services check who may do what and the limits, this module writes. Each change is
one fenced statement: cancel only what is unfinished, reopen only what is FAILED or CANCELLED.
Jobs are enqueued, or dropped, after the commit.
"""

from __future__ import annotations

from collections.abc import Sequence

from flask import current_app
from sqlalchemy import Connection, RowMapping, delete, update

from ..extensions import db
from ..models import UNFINISHED, IdempotencyKey, Task, TaskStatus, User, utcnow
from ..queues import new_job_id
from .hooks import _accepted, _changed, _removed, _reopened
from .queueing import drop_job, enqueue

_tasks = Task.__table__
REOPENABLE = (TaskStatus.FAILED.value, TaskStatus.CANCELLED.value)
# What the owner reads on a cancelled task, by who cancelled it.
CANCELLED_BY = {"user": "Cancelled by the user.", "admin": "Cancelled by an administrator."}


def submit(
    user: User,
    prompt: str,
    model: str,
    priority: int,
    params: dict,
    idempotency: tuple[str, str] | None = None,
) -> Task:
    """Insert a task PENDING, naming its job; commit; enqueue it. Return the task.

    `idempotency` is (key, request hash): the key is recorded in the same transaction. An
    IntegrityError (another request with the same key won) comes back rolled back.
    """
    task = Task(
        user_id=user.id,
        prompt=prompt,
        model=model,
        priority=priority,
        params=params,
        status=TaskStatus.PENDING.value,
        max_attempts=current_app.config["TASK_MAX_ATTEMPTS"],
    )
    try:
        db.session.add(task)
        db.session.flush()  # assigns the id, in the same transaction
        # The job id is recorded before the commit, so the row names its job from the start.
        task.job_id = new_job_id(task.id)
        if idempotency:
            key, request_hash = idempotency
            db.session.add(IdempotencyKey(user_id=user.id, key=key, request_hash=request_hash, task_id=task.id))
        _accepted(db.session.connection(), user, task)
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise
    enqueue(task.id, task.priority, task.model, job_id=task.job_id)
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
        )
        .returning(*_tasks.c)
    )
    rows = _changed(connection, statement)
    jobs = {row["id"]: new_job_id(row["id"]) for row in rows}
    if jobs:
        # In the same transaction: each reopened row names its new job from the start.
        db.session.execute(update(Task), [{"id": task_id, "job_id": job_id} for task_id, job_id in jobs.items()])
        _reopened(connection, rows)
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
