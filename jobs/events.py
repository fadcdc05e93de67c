"""What happens to a task inside a worker, reported in one place.

Each function is one event of an attempt: one log line naming the task and its job's label (the
RQ job id, "-" when run outside a worker; also as `task_id` / `job_id` fields, for JSON logs),
and the metrics of that event, sent to Redis in one round trip (webapp/metrics.py), so the job
code says what happened once.
"""

from __future__ import annotations

import logging
from decimal import Decimal

from rq import get_current_job

from webapp.lifecycle.attempts import Claim
from webapp.metrics import Batch
from webapp.models import utcnow

from .provider import ProviderError

log = logging.getLogger("jobs.events")


def _ids(task_id: int, label: str) -> dict:
    return {"extra": {"task_id": task_id, "job_id": label}}


def _queue_wait() -> float | None:
    """Return the seconds the running job waited in its queue (since RQ enqueued it), if known."""
    job = get_current_job()
    if job is None or job.enqueued_at is None:
        return None
    enqueued = job.enqueued_at
    if enqueued.tzinfo is None:  # RQ stores UTC
        enqueued = enqueued.replace(tzinfo=utcnow().tzinfo)
    return (utcnow() - enqueued).total_seconds()


def skipped(task_id: int, label: str) -> None:
    """The job found its task not PENDING: a duplicate delivery, or it was cancelled."""
    log.info(
        "task %s job %s: not PENDING any more (duplicate or cancelled); nothing to do",
        task_id,
        label,
        **_ids(task_id, label),
    )


def claimed(task: Claim, label: str) -> None:
    log.info(
        "task %s job %s: attempt %s/%s on %s",
        task.task_id,
        label,
        task.attempt,
        task.max_attempts,
        task.model,
        **_ids(task.task_id, label),
    )
    batch = Batch().inc("atr_task_attempts", model=task.model)
    wait = _queue_wait()
    if wait is not None:
        batch.observe("atr_task_queue_wait_seconds", wait, model=task.model)
    batch.send()


def completed(
    task: Claim,
    label: str,
    completion_tokens: int,
    seconds: float,
    prompt_tokens: int | None = None,
    cost: Decimal | None = None,
) -> None:
    log.info(
        "task %s job %s: completed (%s tokens in %.1f s)",
        task.task_id,
        label,
        completion_tokens,
        seconds,
        **_ids(task.task_id, label),
    )
    (
        Batch()
        .inc("atr_tasks_completed", model=task.model)
        .inc("atr_tokens", completion_tokens or 0, model=task.model, type="completion")
        .inc("atr_tokens", prompt_tokens or 0, model=task.model, type="prompt")
        .observe("atr_task_run_seconds", seconds, model=task.model)
        .inc("atr_cost_usd", float(cost or 0), model=task.model)
        .send()
    )


def stopped(task: Claim, label: str) -> None:
    """The task was cancelled, deleted or taken back while the attempt ran."""
    log.info(
        "task %s job %s: cancelled, deleted or taken back while running; stopped",
        task.task_id,
        label,
        **_ids(task.task_id, label),
    )
    Batch().inc("atr_tasks_stopped", model=task.model).send()


def retrying(task: Claim, label: str, err: ProviderError, delay: float, next_job: str | None) -> None:
    log.warning(
        "task %s job %s: %s; retry in %.1f s as %s",
        task.task_id,
        label,
        err.kind,
        delay,
        next_job,
        **_ids(task.task_id, label),
    )
    (
        Batch()
        .inc("atr_task_retries", model=task.model, kind=err.kind)
        .inc("atr_provider_errors", model=task.model, kind=err.kind)
        .send()
    )


def failed(task: Claim, label: str, kind: str) -> None:
    log.warning("task %s job %s: failed (%s)", task.task_id, label, kind, **_ids(task.task_id, label))
    (
        Batch()
        .inc("atr_tasks_failed", model=task.model, kind=kind)
        .inc("atr_provider_errors", model=task.model, kind=kind)
        .send()
    )


def database_lost(task: Claim, label: str) -> None:
    log.warning(
        "task %s job %s: database error; the sweeper will take it back",
        task.task_id,
        label,
        **_ids(task.task_id, label),
    )
    Batch().inc("atr_provider_errors", model=task.model, kind="database").send()


def crashed(task: Claim, label: str) -> None:
    log.exception("task %s job %s: unexpected error", task.task_id, label, **_ids(task.task_id, label))
    Batch().inc("atr_provider_errors", model=task.model, kind="internal").send()


def paused(task_id: int, label: str, model: str, delay: float, next_job: str | None, reason: str) -> None:
    """The model's breaker is open or a limit is reached: the task waits, unclaimed, without spending an attempt."""
    log.info(
        "task %s job %s: model %s paused (%s); deferred %.1f s as %s",
        task_id,
        label,
        model,
        reason,
        delay,
        next_job,
        **_ids(task_id, label),
    )
    Batch().inc("atr_tasks_deferred", model=model).send()


def in_line(task_id: int, label: str, model: str) -> None:
    """The model's calls in flight are at its concurrency: the task waits in its line, unclaimed."""
    log.info(
        "task %s job %s: model %s busy (concurrency limit); waiting in line for a free slot",
        task_id,
        label,
        model,
        **_ids(task_id, label),
    )
    Batch().inc("atr_tasks_waited", model=model).send()


def waiting(task: Claim, label: str, err: ProviderError, seconds: float) -> None:
    """A short Retry-After: the worker waits it out, then starts the next attempt in place."""
    log.info(
        "task %s job %s: %s; waiting %.1f s before the next attempt",
        task.task_id,
        label,
        err.kind,
        seconds,
        **_ids(task.task_id, label),
    )
    (
        Batch()
        .inc("atr_task_retries", model=task.model, kind=err.kind)
        .inc("atr_provider_errors", model=task.model, kind=err.kind)
        .send()
    )


def handed_back(task: Claim, label: str, reason: str, next_job: str | None) -> None:
    """The worker gave the task back unfinished (it is shutting down); the attempt is refunded."""
    log.info(
        "task %s job %s: handed back (%s) as %s", task.task_id, label, reason, next_job, **_ids(task.task_id, label)
    )
    Batch().inc("atr_tasks_handed_back", model=task.model).send()


def released(task_id: int, label: str, reason: str, status: str | None) -> None:
    """A task was taken back from an attempt that ended without a word (its work-horse died)."""
    log.warning(
        "task %s job %s: %s; task now %s",
        task_id,
        label,
        reason,
        status or "not ours any more",
        **_ids(task_id, label),
    )
    Batch().inc("atr_tasks_released").send()


def circuit_opened(model: str, seconds: float) -> None:
    """A model's provider kept failing: its breaker opened, pausing it for `seconds`."""
    log.warning("model %s: circuit breaker open for %.0f s after repeated failures", model, seconds)
    Batch().inc("atr_circuit_opened", model=model).send()


def fell_back(task_id: int, label: str, model: str, to: str, kind: str, detail: str) -> None:
    """The task's model was unavailable: it moved on to the next model of its chain (not a failure)."""
    log.info(
        "task %s job %s: model %s unavailable (%s); moved on to %s",
        task_id,
        label,
        model,
        detail,
        to,
        **_ids(task_id, label),
    )
    Batch().inc("atr_task_fallbacks", model=model, to=to, kind=kind).send()
