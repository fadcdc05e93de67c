"""A batch's life: every change of a batch's status, each one fenced on the status it leaves.

    validating ─▶ in_progress ─▶ finalizing ─▶ completed
        │              │
        ▼              ├─▶ cancelling ─▶ cancelled   (also from validating)
      failed           └─▶ expired                   (the completion window ran out)

Each function takes a connection inside the caller's transaction and returns whether it moved
the batch (a miss means someone else moved it first: a cancel racing the intake, two passes of
the sweeper). The tasks of a batch's lines are created here, PENDING, in the transaction that
moves the batch to in_progress, so a batch is either still validating with no tasks or in
progress with all of them.

A batch that ends (completed, failed, cancelled, expired) has its webhook deliveries written in
the transaction of that change (`hooks._batch_ended`).

`advance` moves a batch on once its lines have all finished: it makes the output and error
files' rows (their bytes counted by making their content once) and ends the batch. Until the
task lifecycle tells batches about finished tasks, the scheduler's pass (`services/batches.sweep`)
and a read of the batch (which enqueues `jobs.batches.advance`) notice such a batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from flask import current_app
from sqlalchemy import Connection, String, cast, func, insert, literal, select, update

from .. import batch_content
from ..batch_models import ENDED_BATCH, Batch, BatchLineError, BatchStatus, StoredFile, new_file_id
from ..extensions import db
from ..models import UNFINISHED, Task, TaskStatus, utcnow
from .hooks import _batch_ended, _changed

_batches = Batch.__table__
_tasks = Task.__table__
# Rows per INSERT statement when a batch's tasks are created.
INSERT_ROWS = 1000


def _move(connection: Connection, batch_id: str, leaving: tuple[str, ...], **values) -> bool:
    """Change the batch's status if it is still one of `leaving`; an ending goes to hooks._batch_ended."""
    values.setdefault("updated_at", utcnow())
    statement = update(_batches).where(_batches.c.id == batch_id, _batches.c.status.in_(leaving)).values(**values)
    if values["status"] not in ENDED_BATCH:
        return connection.execute(statement).rowcount == 1
    rows = connection.execute(statement.returning(*_batches.c)).mappings().all()
    _batch_ended(connection, rows)  # its webhook deliveries, in this transaction
    return len(rows) == 1


def fail_validation(connection: Connection, batch_id: str, errors: list[dict]) -> bool:
    """validating → failed: the file as a whole is not a batch (errors: code, message, line, param)."""
    now = utcnow()
    return _move(
        connection,
        batch_id,
        (BatchStatus.VALIDATING.value,),
        status=BatchStatus.FAILED.value,
        errors=errors,
        failed_at=now,
    )


def pending_rows(user_id: int, batch_id: str, priority: int, lines: Iterable[dict]) -> Iterable[dict]:
    """Return the rows of new PENDING tasks for good lines (each: prompt, model, params, custom_id, line)."""
    attempts = current_app.config["TASK_MAX_ATTEMPTS"]
    now = utcnow()
    for line in lines:
        yield {
            "user_id": user_id,
            "prompt": line["prompt"],
            "model": line["model"],
            "priority": priority,
            "params": line["params"],
            "status": TaskStatus.PENDING.value,
            "progress": 0,
            "attempts": 0,
            "max_attempts": attempts,
            "created_at": now,
            "updated_at": now,
            "batch_id": batch_id,
            "custom_id": line["custom_id"],
            "batch_line": line["line"],
            "reserved_usd": None,
            "reserved_month": None,
        }


def add_tasks(connection: Connection, rows: list[dict]) -> list[int]:
    """Insert PENDING tasks for a batch's lines (multi-row INSERTs); return their ids in order."""
    ids: list[int] = []
    for start in range(0, len(rows), INSERT_ROWS):
        result = connection.execute(
            insert(_tasks).returning(_tasks.c.id, sort_by_parameter_order=True), rows[start : start + INSERT_ROWS]
        )
        ids.extend(result.scalars())
    return ids


def add_line_errors(connection: Connection, batch_id: str, errors: list[dict]) -> None:
    """Record lines that parsed but cannot run; they go to the error file."""
    if errors:
        connection.execute(insert(BatchLineError.__table__), [{"batch_id": batch_id, **error} for error in errors])


def start(connection: Connection, batch_id: str, job_suffix: str) -> bool:
    """validating → in_progress, once its tasks are inserted; name each task's job `task-<id>-<suffix>`."""
    now = utcnow()
    if not _move(
        connection, batch_id, (BatchStatus.VALIDATING.value,), status=BatchStatus.IN_PROGRESS.value, in_progress_at=now
    ):
        return False
    connection.execute(
        update(_tasks)
        .where(_tasks.c.batch_id == batch_id)
        .values(job_id=literal("task-") + cast(_tasks.c.id, String) + literal("-" + job_suffix))
    )
    return True


def counts(connection: Connection, batch_id: str) -> dict:
    """Return the batch's request_counts from its tasks and line errors, and how many are unfinished."""
    by_status = dict(
        connection.execute(
            select(_tasks.c.status, func.count()).where(_tasks.c.batch_id == batch_id).group_by(_tasks.c.status)
        ).all()
    )
    line_errors = connection.scalar(
        select(func.count()).select_from(BatchLineError.__table__).where(BatchLineError.batch_id == batch_id)
    )
    total = connection.scalar(select(_batches.c.total).where(_batches.c.id == batch_id)) or 0
    failed = line_errors + by_status.get(TaskStatus.FAILED.value, 0) + by_status.get(TaskStatus.CANCELLED.value, 0)
    return {
        "total": total,
        "completed": by_status.get(TaskStatus.COMPLETED.value, 0),
        "failed": failed,
        "unfinished": sum(by_status.get(status, 0) for status in UNFINISHED),
    }


def finalizing(connection: Connection, batch_id: str) -> bool:
    """in_progress → finalizing: every line has finished; the output and error files are being made."""
    return _move(
        connection,
        batch_id,
        (BatchStatus.IN_PROGRESS.value,),
        status=BatchStatus.FINALIZING.value,
        finalizing_at=utcnow(),
    )


def ended(
    connection: Connection,
    batch_id: str,
    leaving: str,
    status: str,
    output_file_id: str | None,
    error_file_id: str | None,
    tally: dict,
    now: datetime | None = None,
) -> bool:
    """finalizing → completed, cancelling → cancelled or in_progress → expired, with the files and counts."""
    now = now or utcnow()
    stamp = {BatchStatus.COMPLETED.value: "completed_at", BatchStatus.CANCELLED.value: "cancelled_at"}.get(
        status, "expired_at"
    )
    return _move(
        connection,
        batch_id,
        (leaving,),
        status=status,
        output_file_id=output_file_id,
        error_file_id=error_file_id,
        completed=tally["completed"],
        failed=tally["failed"],
        **{stamp: now},
    )


def stop_tasks(connection: Connection, batch_id: str, kind: str, message: str) -> int:
    """Cancel a batch's unfinished tasks (queued ones never start; a running one stops at its next write)."""
    now = utcnow()
    statement = (
        update(_tasks)
        .where(_tasks.c.batch_id == batch_id, _tasks.c.status.in_(UNFINISHED))
        .values(
            status=TaskStatus.CANCELLED.value,
            error=message,
            error_kind=kind,
            lease_expires_at=None,
            finished_at=now,
            updated_at=now,
        )
        .returning(*_tasks.c)
    )
    return len(_changed(connection, statement))  # the cancelled rows go to hooks._finished


def cancelling(connection: Connection, batch_id: str) -> bool:
    """validating or in_progress → cancelling, and the batch's unfinished tasks cancelled."""
    moved = _move(
        connection,
        batch_id,
        (BatchStatus.VALIDATING.value, BatchStatus.IN_PROGRESS.value),
        status=BatchStatus.CANCELLING.value,
        cancelling_at=utcnow(),
    )
    if moved:
        stop_tasks(connection, batch_id, "cancelled", "Cancelled with its batch.")
    return moved


def expiring(connection: Connection, batch_id: str) -> bool:
    """Cancel an in-progress batch's unfinished lines when its window has run out (they go to the error file)."""
    row = connection.execute(
        select(_batches.c.status, _batches.c.expires_at).where(_batches.c.id == batch_id).with_for_update()
    ).first()
    if row is None or row.status != BatchStatus.IN_PROGRESS.value:
        return False
    stop_tasks(connection, batch_id, "batch_expired", "The batch's completion window ended before this line ran.")
    return True


def advance(batch_id: str) -> str:
    """Move a batch on if it can: expire it, finalize it, or end its cancelling; return its status."""
    batch = db.session.get(Batch, batch_id, populate_existing=True)
    if batch is None:
        return "gone"
    status = batch.status
    connection = db.session.connection()
    if status == BatchStatus.IN_PROGRESS.value and batch.expires_at <= utcnow():
        expiring(connection, batch_id)
        db.session.commit()
        return _end(batch, BatchStatus.IN_PROGRESS.value, BatchStatus.EXPIRED.value)
    if status in (BatchStatus.IN_PROGRESS.value, BatchStatus.CANCELLING.value):
        if counts(connection, batch_id)["unfinished"]:
            db.session.commit()
            return status
        if status == BatchStatus.CANCELLING.value:
            return _end(batch, status, BatchStatus.CANCELLED.value)
        finalizing(connection, batch_id)
        db.session.commit()
        status = BatchStatus.FINALIZING.value
    if status == BatchStatus.FINALIZING.value:
        return _end(batch, status, BatchStatus.COMPLETED.value)
    db.session.commit()
    return status


def _end(batch: Batch, leaving: str, status: str) -> str:
    """Make the output and error files (bytes counted by making them once) and end the batch."""
    tally = counts(db.session.connection(), batch.id)
    db.session.commit()
    files = {}
    for kind in ("output", "error"):
        size = lines = 0
        for line in batch_content.content(batch.id, kind):
            size += len(line)
            lines += 1
        if lines:
            files[kind] = StoredFile(
                id=new_file_id(),
                user_id=batch.user_id,
                purpose="batch_output",
                filename=f"{batch.id}_{kind}.jsonl",
                bytes=size,
                lines=lines,
                kind=kind,
                batch_id=batch.id,
            )
    for stored in files.values():
        db.session.add(stored)
    db.session.flush()
    output, error = files.get("output"), files.get("error")
    moved = ended(db.session.connection(), batch.id, leaving, status, output and output.id, error and error.id, tally)
    if not moved:
        db.session.rollback()  # another pass ended it first
    else:
        db.session.commit()
    db.session.refresh(batch)
    return batch.status
