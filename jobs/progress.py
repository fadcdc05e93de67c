"""The worker's writes to a task: the atomic claim, progress, the lease, and fenced final writes.

Every write after the claim is fenced by the attempt number and status PROCESSING, so a worker
whose task was cancelled, deleted or taken back by the sweeper changes nothing.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from flask import Flask, current_app
from sqlalchemy import update

from webapp.extensions import db
from webapp.models import Task, TaskStatus, utcnow

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


def _fenced(claim: Claim):
    return update(Task).where(
        Task.id == claim.task_id,
        Task.attempts == claim.attempt,
        Task.status == TaskStatus.PROCESSING.value,
    )


def _write(statement) -> bool:
    """Run a fenced UPDATE; return whether it hit the row."""
    result = db.session.execute(statement)
    db.session.commit()
    return result.rowcount == 1


def claim(task_id: int) -> Claim | None:
    """Take a PENDING task atomically, or return None (a duplicate job, or it was cancelled)."""
    now = utcnow()
    row = db.session.execute(
        update(Task)
        .where(Task.id == task_id, Task.status == TaskStatus.PENDING.value)
        .values(
            status=TaskStatus.PROCESSING.value,
            attempts=Task.attempts + 1,
            lease_expires_at=_lease(now),
            started_at=now,
            progress=0,
            result=None,
            run_after=None,
        )
        .returning(Task.attempts, Task.max_attempts, Task.prompt, Task.model, Task.priority, Task.params)
    ).first()
    db.session.commit()
    if row is None:
        return None
    return Claim(task_id, row.attempts, row.max_attempts, row.prompt, row.model, row.priority, row.params or {})


def report(claim: Claim, text: str, progress: int) -> bool:
    """Save the text so far and renew the lease; False means the task is no longer ours."""
    return _write(_fenced(claim).values(result=text, progress=min(progress, 99), lease_expires_at=_lease(utcnow())))


def renew(claim: Claim) -> bool:
    """Renew the lease only; False means the task is no longer ours."""
    return _write(_fenced(claim).values(lease_expires_at=_lease(utcnow())))


def complete(claim: Claim, text: str, prompt_tokens: int | None, completion_tokens: int | None) -> bool:
    """Record the answer: the one final write of a successful attempt."""
    return _write(
        _fenced(claim).values(
            status=TaskStatus.COMPLETED.value,
            result=text,
            progress=100,
            error=None,
            error_kind=None,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            lease_expires_at=None,
            finished_at=utcnow(),
        )
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


def hand_back(claim: Claim, kind: str, message: str, delay: float, job_id: str | None) -> bool:
    """Put the task back to PENDING, due after `delay` seconds, with the job that will run it."""
    return _write(
        _fenced(claim).values(
            status=TaskStatus.PENDING.value,
            error=message,
            error_kind=kind,
            result=None,
            progress=0,
            lease_expires_at=None,
            run_after=utcnow() + timedelta(seconds=delay),
            job_id=job_id,
        )
    )


class LeaseKeeper:
    """Renews the lease of a claimed task in a background thread while the job works.

    The stream may be silent for a while (a slow first token), so the lease must not depend on
    chunks arriving. If a renewal finds the task is no longer ours, `lost` is set; the job checks
    it at every chunk.
    """

    def __init__(self, app: Flask, claim: Claim):
        self.app = app
        self.claim = claim
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{claim.task_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        interval = self.app.config["LEASE_SECONDS"] / 3
        with self.app.app_context():
            while not self._stop.wait(interval):
                try:
                    still_ours = renew(self.claim)
                except Exception:  # a database blip: the lease has room for a few misses
                    log.warning("task %s: lease renewal failed", self.claim.task_id, exc_info=True)
                    db.session.rollback()
                    continue
                finally:
                    db.session.remove()
                if not still_ours:
                    self.lost.set()
                    return
