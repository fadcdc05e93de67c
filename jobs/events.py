"""What happens to a task inside a worker, reported in one place.

Each function is one event of an attempt. Today they write one log line each, naming the task
and its job; metrics hang off the same calls, so the job code says what happened once.
"""

from __future__ import annotations

import logging

from .progress import Claim
from .provider import ProviderError

log = logging.getLogger("jobs.events")


def skipped(task_id: int, job_id: str) -> None:
    """The job found its task not PENDING: a duplicate delivery, or it was cancelled."""
    log.info("task %s job %s: not PENDING any more (duplicate or cancelled); nothing to do", task_id, job_id)


def claimed(task: Claim, job_id: str) -> None:
    log.info("task %s job %s: attempt %s/%s on %s", task.task_id, job_id, task.attempt, task.max_attempts, task.model)


def completed(task: Claim, job_id: str, completion_tokens: int, seconds: float) -> None:
    log.info("task %s job %s: completed (%s tokens in %.1f s)", task.task_id, job_id, completion_tokens, seconds)


def stopped(task: Claim, job_id: str) -> None:
    """The task was cancelled, deleted or taken back while the attempt ran."""
    log.info("task %s job %s: cancelled, deleted or taken back while running; stopped", task.task_id, job_id)


def retrying(task: Claim, job_id: str, err: ProviderError, delay: float, next_job: str | None) -> None:
    log.warning("task %s job %s: %s; retry in %.1f s as %s", task.task_id, job_id, err.kind, delay, next_job)


def failed(task: Claim, job_id: str, kind: str) -> None:
    log.warning("task %s job %s: failed (%s)", task.task_id, job_id, kind)


def database_lost(task: Claim, job_id: str) -> None:
    log.warning("task %s job %s: database error; the sweeper will take it back", task.task_id, job_id)


def crashed(task: Claim, job_id: str) -> None:
    log.exception("task %s job %s: unexpected error", task.task_id, job_id)


def paused(task_id: int, job_id: str, model: str, delay: float, next_job: str | None) -> None:
    """The model's circuit breaker is open: the task waits, unclaimed, without spending an attempt."""
    log.info(
        "task %s job %s: model %s paused (circuit open); deferred %.1f s as %s", task_id, job_id, model, delay, next_job
    )


def waiting(task: Claim, job_id: str, err: ProviderError, seconds: float) -> None:
    """A short Retry-After: the worker waits it out, then starts the next attempt in place."""
    log.info("task %s job %s: %s; waiting %.1f s before the next attempt", task.task_id, job_id, err.kind, seconds)


def handed_back(task: Claim, job_id: str, reason: str, next_job: str | None) -> None:
    """The worker gave the task back unfinished (it is shutting down); the attempt is refunded."""
    log.info("task %s job %s: handed back (%s) as %s", task.task_id, job_id, reason, next_job)


def released(task_id: int, job_id: str, reason: str, status: str | None) -> None:
    """A task was taken back from an attempt that ended without a word (its work-horse died)."""
    log.warning("task %s job %s: %s; task now %s", task_id, job_id, reason, status or "not ours any more")


def circuit_opened(model: str, seconds: float) -> None:
    """A model's provider kept failing: its breaker opened, pausing it for `seconds`."""
    log.warning("model %s: circuit breaker open for %.0f s after repeated failures", model, seconds)
