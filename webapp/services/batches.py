"""OpenAI's Batch API: create a batch from an uploaded file, read, list and cancel it, and see it through.

Creating a batch checks the request (endpoint, window, metadata, the file) and records it as
`validating`; a job (`jobs/batches.py`) then reads the file and creates its tasks
(`jobs/batch_intake.py`). `lifecycle.advance` moves a batch on once its tasks have all finished:
finalizing, then completed (or cancelled, or expired) with its output and error files.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta

from flask import current_app
from redis.exceptions import RedisError
from sqlalchemy import delete, func, select, tuple_

from ..batch_models import ACTIVE_BATCH, ENDED_BATCH, Batch, BatchStatus, StoredFile
from ..errors import ConflictError, NotFoundError, RateLimitedError, ValidationError
from ..extensions import db
from ..lifecycle import batches as lifecycle
from ..models import User, utcnow
from ..queues import enqueue_call, redis
from .files import get_file

log = logging.getLogger(__name__)
# What a batch or file id can look like (ours are batch_/file- and 24 hex digits): anything else
# is not looked up at all (a NUL byte could not even be sent to PostgreSQL).
PUBLIC_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")

ENDPOINTS = ("/v1/chat/completions",)
WINDOWS = {"24h": timedelta(hours=24)}
METADATA_KEYS = 16
METADATA_KEY_MAX = 64
METADATA_VALUE_MAX = 512
LIST_MAX = 100
# A batch still validating this long after its creation (its job lost) is given a new job.
STUCK_SECONDS = 120
INTAKE_JOB = "jobs.batches.intake"
ADVANCE_JOB = "jobs.batches.advance"
NUDGE_SECONDS = 5


class BatchNotFoundError(NotFoundError):
    def __init__(self, batch_id: str):
        super().__init__(f"No batch {batch_id!r} is yours: check the id (GET /api/v1/batches lists your batches).")


def check_metadata(metadata) -> dict | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise ValidationError("metadata must be an object of strings.", {"metadata": "expected an object"})
    if len(metadata) > METADATA_KEYS:
        raise ValidationError(
            f"metadata has {len(metadata)} keys; at most {METADATA_KEYS} are allowed.",
            {"metadata": f"at most {METADATA_KEYS} keys"},
        )
    for key, value in metadata.items():
        if len(key) > METADATA_KEY_MAX or "\x00" in key:
            raise ValidationError(
                f"metadata keys are at most {METADATA_KEY_MAX} characters.", {f"metadata.{key[:64]}": "key too long"}
            )
        if not isinstance(value, str) or len(value) > METADATA_VALUE_MAX or "\x00" in value:
            raise ValidationError(
                f"metadata values are strings of at most {METADATA_VALUE_MAX} characters ({key!r} is not).",
                {f"metadata.{key}": f"a string of at most {METADATA_VALUE_MAX} characters"},
            )
    return metadata


def create_batch(
    user: User,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: dict | None = None,
    input_format: str = "jsonl",
    model: str | None = None,
) -> Batch:
    """Record a batch of the user's uploaded file as validating and start its intake."""
    if endpoint not in ENDPOINTS:
        raise ValidationError(
            f"endpoint must be /v1/chat/completions (got {endpoint!r}): only chat completions run in batches here.",
            {"endpoint": "must be /v1/chat/completions"},
        )
    if completion_window not in WINDOWS:
        raise ValidationError(
            f"completion_window must be '24h' (got {completion_window!r}).", {"completion_window": "must be 24h"}
        )
    metadata = check_metadata(metadata)
    stored = get_file(user, input_file_id)
    if stored.kind != "upload" or stored.purpose != "batch":
        raise ValidationError(
            f"File {stored.id} is a batch's {stored.kind} file; upload a file with purpose 'batch' as the input.",
            {"input_file_id": "not an input file"},
        )
    _check_active(user)
    now = utcnow()
    batch = Batch(
        user_id=user.id,
        status=BatchStatus.VALIDATING.value,
        endpoint=endpoint,
        completion_window=completion_window,
        input_file_id=stored.id,
        input_format=input_format,
        model=model,
        priority=current_app.config["BATCH_PRIORITY"],
        metadata_=metadata,
        total=stored.lines,
        created_at=now,
        expires_at=now + WINDOWS[completion_window],
    )
    db.session.add(batch)
    db.session.commit()
    _start_job(INTAKE_JOB, batch.id)
    return batch


def _check_active(user: User) -> None:
    cap = current_app.config["BATCH_MAX_ACTIVE"]
    if cap <= 0 or not current_app.config["RATELIMIT_ENABLED"]:
        return
    active = db.session.scalar(
        select(func.count()).select_from(Batch).where(Batch.user_id == user.id, Batch.status.in_(ACTIVE_BATCH))
    )
    if active >= cap:
        raise RateLimitedError(
            f"You have {active} unfinished batches, the most allowed at once ({cap}). "
            "Wait for one to finish (or cancel one), then create the batch again.",
            60,
            {"batches_active": active, "limit": cap},
        )


def _start_job(function: str, batch_id: str) -> None:
    try:
        enqueue_call(function, batch_id)
    except RedisError as exc:
        log.warning("batch %s: job %s not enqueued (%s); the sweeper will run it", batch_id, function, exc)


def _nudge(batch_id: str) -> None:
    """Enqueue the job that moves a finished batch on, at most once per NUDGE_SECONDS however often it is read."""
    try:
        if redis().set(f"atr:batch:{batch_id}:nudged", 1, nx=True, ex=NUDGE_SECONDS):
            enqueue_call(ADVANCE_JOB, batch_id)
    except RedisError as exc:
        log.warning("batch %s: not moved on now (%s); the sweeper will", batch_id, exc)


def get_batch(user: User, batch_id: str) -> Batch:
    batch = db.session.get(Batch, batch_id) if PUBLIC_ID.fullmatch(batch_id) else None
    if batch is None or batch.user_id != user.id:
        raise BatchNotFoundError(batch_id)
    return batch


def request_counts(batch: Batch) -> dict:
    """Return the batch's request_counts: live from its tasks while it runs, as recorded once it ended."""
    if batch.status not in (BatchStatus.IN_PROGRESS.value, BatchStatus.FINALIZING.value, BatchStatus.CANCELLING.value):
        return {"total": batch.total, "completed": batch.completed, "failed": batch.failed}
    tally = lifecycle.counts(db.session.connection(), batch.id)
    return {"total": tally["total"], "completed": tally["completed"], "failed": tally["failed"]}


def batch_view(batch: Batch) -> dict:
    """Return the batch object, nudging a batch whose lines have all finished towards its end."""
    counts = request_counts(batch)
    if batch.status == BatchStatus.IN_PROGRESS.value and counts["completed"] + counts["failed"] >= counts["total"]:
        _nudge(batch.id)
    return batch.to_dict(counts)


def list_batches(user: User, limit: int = 20, after: str | None = None) -> tuple[list[Batch], bool]:
    """Return the user's batches newest first, after the batch `after`, and whether more follow."""
    if not 1 <= limit <= LIST_MAX:
        raise ValidationError(f"limit must be between 1 and {LIST_MAX}.", {"limit": f"1 to {LIST_MAX}"})
    query = select(Batch).where(Batch.user_id == user.id)
    if after:
        pivot = get_batch(user, after)
        query = query.where(tuple_(Batch.created_at, Batch.id) < tuple_(pivot.created_at, pivot.id))
    rows = list(db.session.scalars(query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def cancel_batch(user: User, batch_id: str) -> Batch:
    """Cancel a batch: queued lines never start, running ones stop; what finished stays in its output."""
    batch = get_batch(user, batch_id)
    moved = lifecycle.cancelling(db.session.connection(), batch.id)
    db.session.commit()
    db.session.refresh(batch)
    if not moved:
        if batch.status in (BatchStatus.CANCELLING.value, BatchStatus.CANCELLED.value):
            return batch
        raise ConflictError(
            f"Batch {batch.id} is already {batch.status} and cannot be cancelled.", {"status": batch.status}
        )
    lifecycle.advance(batch.id)
    db.session.refresh(batch)
    return batch


def sweep() -> int:
    """Give lost intake jobs a new one, and move on batches whose lines have finished or whose window ran out."""
    now = utcnow()
    stuck = list(
        db.session.scalars(
            select(Batch.id).where(
                Batch.status == BatchStatus.VALIDATING.value, Batch.created_at < now - timedelta(seconds=STUCK_SECONDS)
            )
        )
    )
    running = list(
        db.session.scalars(
            select(Batch.id).where(
                Batch.status.in_(
                    (BatchStatus.IN_PROGRESS.value, BatchStatus.FINALIZING.value, BatchStatus.CANCELLING.value)
                )
            )
        )
    )
    db.session.commit()
    for batch_id in stuck:
        _start_job(INTAKE_JOB, batch_id)
    moved = 0
    for batch_id in running:
        try:
            before = db.session.get(Batch, batch_id).status
            if lifecycle.advance(batch_id) != before:
                moved += 1
        except Exception:
            db.session.rollback()
            log.exception("batch %s: could not move it on", batch_id)
    return moved + len(stuck)


def cleanup() -> int:
    """Delete batches that ended more than RETENTION_DAYS ago (their tasks and output files go with them)
    and uploaded files as old that no unfinished batch reads; return how many rows went."""
    days = current_app.config["RETENTION_DAYS"]
    if days <= 0:
        return 0
    cutoff = utcnow() - timedelta(days=days)
    ended_at = func.coalesce(Batch.completed_at, Batch.failed_at, Batch.cancelled_at, Batch.expired_at)
    old_batches = list(
        db.session.scalars(select(Batch.id).where(Batch.status.in_(ENDED_BATCH), ended_at < cutoff).limit(1000))
    )
    if old_batches:
        db.session.execute(delete(Batch).where(Batch.id.in_(old_batches)))
    in_use = select(Batch.input_file_id).where(Batch.status.in_(ACTIVE_BATCH))
    files = db.session.execute(
        delete(StoredFile).where(
            StoredFile.kind == "upload", StoredFile.created_at < cutoff, StoredFile.id.not_in(in_use)
        )
    ).rowcount
    db.session.commit()
    if old_batches or files:
        log.info("retention: deleted %s batches and %s files older than %s days", len(old_batches), files, days)
    return len(old_batches) + files
