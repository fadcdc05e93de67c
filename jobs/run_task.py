"""What a worker runs for a task: claim it, stream the answer into the row, finish it once."""

from __future__ import annotations

import contextlib
import random
import time

from flask import current_app
from redis.exceptions import RedisError
from rq import get_current_job
from rq.timeouts import JobTimeoutException
from sqlalchemy.exc import DBAPIError

from webapp.catalog import catalog
from webapp.queues import enqueue_task
from webapp.services.tasks import job_timeout

from . import events, progress
from .progress import Claim, LeaseKeeper
from .provider import ProviderError, Usage, stream_answer


class TaskAttemptError(Exception):
    """Raised to RQ when an attempt fails, so its registries show the failure.

    It carries ids and an error class only: RQ stores it in Redis, and rq-dashboard shows it.
    """


def backoff_delay(attempt: int, retry_after: float | None) -> float:
    """Return seconds before the next attempt: exponential with full jitter, at least Retry-After."""
    config = current_app.config
    ceiling = min(config["RETRY_MAX_SECONDS"], config["RETRY_BASE_SECONDS"] * 2 ** (attempt - 1))
    delay = random.uniform(0, ceiling)
    if retry_after is not None:
        delay = max(delay, min(retry_after, config["RETRY_MAX_SECONDS"]))
    return delay


def run_task(task_id: int) -> str:
    """Run one attempt of a task; return how it ended (RQ keeps only this word)."""
    job = get_current_job()
    job_id = job.id if job else "-"
    task = progress.claim(task_id)
    if task is None:
        events.skipped(task_id, job_id)
        return "skipped"
    events.claimed(task, job_id)
    try:
        return _attempt(task, job_id)
    except TaskAttemptError:
        raise
    except JobTimeoutException:
        err = ProviderError("timeout", "The attempt ran past the worker's time limit.", transient=True)
        return _failed_attempt(task, job_id, err, "")
    except DBAPIError:
        # The database blinked: leave the task PROCESSING; its lease runs out and the sweeper
        # hands it back. Never mark it failed for this.
        events.database_lost(task, job_id)
        # Not the DBAPIError itself: RQ keeps exception text in Redis, and it names the SQL's values.
        raise TaskAttemptError(f"task {task_id} attempt {task.attempt}: database error") from None
    except Exception as exc:
        events.crashed(task, job_id)
        with contextlib.suppress(DBAPIError):
            progress.fail(
                task,
                "internal",
                "The worker hit an internal error. Retry the task; if it keeps failing, tell an operator.",
            )
        raise TaskAttemptError(
            f"task {task_id} attempt {task.attempt}: internal error ({type(exc).__name__})"
        ) from None


def _attempt(task: Claim, job_id: str) -> str:
    spec = catalog().get(task.model)
    if spec is None:
        progress.fail(
            task,
            "unknown_model",
            f"The model {task.model!r} is no longer offered. Submit the prompt again with another model.",
        )
        events.failed(task, job_id, "unknown_model")
        return "failed"
    budget = task.params.get("max_tokens") or spec.default_max_tokens
    interval = current_app.config["PROGRESS_INTERVAL"]
    usage = Usage()
    pieces: list[str] = []
    started = last_write = time.monotonic()
    with LeaseKeeper(current_app._get_current_object(), task) as keeper:
        try:
            for piece in stream_answer(spec, task.prompt, task.params, usage):
                pieces.append(piece)
                if keeper.lost.is_set():
                    return _gone(task, job_id)
                if time.monotonic() - last_write >= interval:
                    # Progress is the share of the token budget produced so far (a chunk is ~a token).
                    share = 100 * len(pieces) // budget
                    if not progress.report(task, "".join(pieces), share):
                        return _gone(task, job_id)
                    last_write = time.monotonic()
        except ProviderError as err:
            return _failed_attempt(task, job_id, err, "".join(pieces))
    text = "".join(pieces)
    if not text.strip():
        err = ProviderError("empty_answer", "The model returned an empty answer.", transient=True)
        return _failed_attempt(task, job_id, err, text)
    tokens = usage.completion_tokens or len(pieces)
    if not progress.complete(task, text, usage.prompt_tokens, tokens):
        return _gone(task, job_id)
    events.completed(task, job_id, tokens, time.monotonic() - started, usage.prompt_tokens)
    return "completed"


def _gone(task: Claim, job_id: str) -> str:
    events.stopped(task, job_id)
    return "stopped"


def _failed_attempt(task: Claim, job_id: str, err: ProviderError, text: str) -> str:
    """Hand the task back for a later attempt, or fail it; then tell RQ the attempt failed."""
    if err.transient and task.attempt < task.max_attempts:
        delay = backoff_delay(task.attempt, err.retry_after)
        # The job for the next attempt is created first; if the fenced write then misses (the
        # task was cancelled meanwhile) that job finds nothing to claim and ends quietly.
        try:
            next_job = enqueue_task(task.task_id, task.priority, job_timeout(task.model), delay)
        except RedisError:
            next_job = None  # the sweeper enqueues it once it is due
        message = f"{err.message} Attempt {task.attempt} of {task.max_attempts} failed; retrying in {delay:.0f} s."
        progress.hand_back(task, err.kind, message, delay, next_job)
        events.retrying(task, job_id, err, delay, next_job)
    else:
        if err.transient:
            message = f"{err.message} Gave up after {task.attempt} attempts; retry the task later."
        else:
            message = err.message
        progress.fail(task, err.kind, message, text)
        events.failed(task, job_id, err.kind)
    raise TaskAttemptError(f"task {task.task_id} attempt {task.attempt}: {err.kind}") from None
