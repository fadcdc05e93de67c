"""What a worker runs for a task: claim it, stream the answer into the row, finish it once.

Every way an attempt can end leads to one fenced write: COMPLETED, FAILED, or back to PENDING
with the job that will run it next. What else can happen, and what it does:

- the model's circuit breaker is open: the task is deferred until it half-opens, unclaimed
  (no attempt spent, no provider call); so is a task over the model's requests or tokens per
  minute, until the limit allows it;
- the model's calls in flight are at its `concurrency`: the task waits in the model's line, its
  job ended, until a freed slot is handed to it (`wake`);
- 429 with a short Retry-After: the worker waits it out and starts the next attempt in place;
  a long one hands the task back with a delayed retry;
- the worker is asked to stop: the attempt finishes within the grace period or hands back
  (attempt refunded);
- the database goes away: the stream goes on, progress writes are skipped, and the final
  write waits for the database (jobs.progress.with_database); nothing fails for it.
"""

from __future__ import annotations

import contextlib
import random
import time

from flask import current_app
from redis.exceptions import RedisError
from rq import get_current_job
from rq.timeouts import JobTimeoutException
from sqlalchemy.exc import DBAPIError

from webapp.catalog import ModelSpec, catalog
from webapp.extensions import db
from webapp.queues import enqueue_task
from webapp.services.tasks import job_timeout

from . import events, progress
from .breaker import Breaker
from .limits import Hold, estimate_tokens, line_place, model_limits
from .progress import Claim, database_unavailable, with_database
from .provider import ProviderError, Usage, stream_answer
from .shutdown import drain
from .tracker import Entry, tracker

# Failures that say something about the provider's health, as opposed to the request's.
BREAKER_KINDS = {"rate_limited", "provider_error", "timeout", "connection", "bad_response"}


class TaskAttemptError(Exception):
    """Raised to RQ when an attempt fails, so its registries show the failure.

    It carries ids and an error class only: RQ stores it in Redis, and rq-dashboard shows it.
    """


class HandedBack(Exception):
    """The attempt gave its task back (the worker is shutting down)."""


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
    job_id = job.id if job else None
    label = job_id or "-"
    pending = with_database(lambda: progress.pending_task(task_id))
    if pending is None:
        events.skipped(task_id, label)
        return "skipped"
    spec = catalog().get(pending.model)
    hold = None
    if spec is not None:
        hold = _admit(task_id, job_id, label, spec, pending)
        if hold is None:
            return "waiting"
    try:
        return _run_claimed(task_id, job_id, label, spec, hold)
    finally:
        if hold is not None:
            wake(spec, model_limits().release(hold, hold.used))


def _admit(task_id: int, job_id: str | None, label: str, spec: ModelSpec, pending: progress.Pending) -> Hold | None:
    """Take a place under the model's limits and past its breaker, or leave the task waiting (None)."""
    budget = pending.params.get("max_tokens") or spec.default_max_tokens
    tokens = estimate_tokens(pending.prompt_chars, pending.params.get("system"), budget)
    place = line_place(pending.priority, task_id)
    verdict, hold = model_limits().acquire(spec, job_id or f"task-{task_id}", tokens, task_id, place, pending.user_id)
    wake(spec, verdict.woken)
    if verdict.allowed:
        breaker = Breaker(spec.name).check(probe_seconds=spec.timeout)
        if breaker.allowed:
            return hold
        wake(spec, model_limits().release(hold))
        wait, reason = breaker.wait, "circuit open"
    elif verdict.limit == "concurrency":
        events.in_line(task_id, label, spec.name)
        return None
    else:
        wait, reason = verdict.wait, f"{verdict.limit} limit"
    delay = wait + random.uniform(0, 1)  # spread the waiting tasks out
    timeout = job_timeout(spec.name)
    new_job = with_database(lambda: progress.defer(task_id, job_id, pending.priority, spec.name, delay, timeout))
    events.paused(task_id, label, spec.name, delay, new_job, reason)
    return None


def wake(spec: ModelSpec, woken: tuple[int, ...]) -> None:
    """Enqueue the tasks that freed slots went to; a task no longer waiting passes its slot on."""
    left = list(woken)
    timeout = job_timeout(spec.name) if left else 0
    while left:
        task_id = left.pop(0)
        if not with_database(lambda task_id=task_id: progress.wake(task_id, timeout)):
            left.extend(model_limits().unreserve(spec.name, spec.concurrency or 0, task_id))


def _run_claimed(task_id: int, job_id: str | None, label: str, spec: ModelSpec | None, hold: Hold | None) -> str:
    task = _claim(task_id, job_id)
    if task is None:
        events.skipped(task_id, label)
        return "skipped"
    events.claimed(task, label)
    budget = task.params.get("max_tokens") or (spec.default_max_tokens if spec else 1)
    tasks = tracker(current_app._get_current_object())
    entry = tasks.add(task, budget, hold)
    try:
        return _attempt(entry, spec, label)
    except TaskAttemptError:
        raise
    except JobTimeoutException:
        err = ProviderError("timeout", "The attempt ran past the worker's time limit.", transient=True)
        return _failed_attempt(entry.claim, label, err, "")
    except DBAPIError as exc:
        db.session.rollback()
        if database_unavailable(exc):
            # The database stayed away longer than DB_RETRY_SECONDS. Leave the task
            # PROCESSING: its lease runs out and the sweeper hands it back. Never mark it
            # failed for this.
            events.database_lost(entry.claim, label)
            # Not the DBAPIError itself: RQ keeps exception text in Redis, and it names the
            # SQL's values (the answer).
            raise TaskAttemptError(f"task {task_id} attempt {entry.claim.attempt}: database error") from None
        return _crashed(entry.claim, label, exc)
    except Exception as exc:
        return _crashed(entry.claim, label, exc)
    finally:
        tasks.remove(entry)


def _claim(task_id: int, job_id: str | None) -> Claim | None:
    """Claim the task, waiting out a database restart; a lost commit reply is recognised."""
    lost_reply = False

    def attempt() -> Claim | None:
        nonlocal lost_reply
        try:
            found = progress.claim(task_id, job_id)
        except DBAPIError:
            lost_reply = True
            raise
        if found is None and lost_reply and job_id:
            return progress.claimed_by(task_id, job_id)
        return found

    return with_database(attempt)


def _crashed(task: Claim, job_id: str, exc: BaseException) -> str:
    events.crashed(task, job_id)
    with contextlib.suppress(DBAPIError):
        progress.fail(
            task,
            "internal",
            "The worker hit an internal error. Retry the task; if it keeps failing, tell an operator.",
        )
    kind = type(exc).__name__
    raise TaskAttemptError(f"task {task.task_id} attempt {task.attempt}: internal error ({kind})") from None


def _attempt(keeper: Entry, spec: ModelSpec | None, job_id: str) -> str:
    task = keeper.claim
    if spec is None:
        with_database(
            lambda: progress.fail(
                task,
                "unknown_model",
                f"The model {task.model!r} is no longer offered. Submit the prompt again with another model.",
            )
        )
        events.failed(task, job_id, "unknown_model")
        return "failed"
    breaker = Breaker(task.model)
    while True:
        try:
            text, usage, pieces, seconds = _stream(keeper, spec, job_id)
            break
        except _Gone:
            return _gone(keeper.claim, job_id)
        except HandedBack:
            return "handed_back"
        except ProviderError as err:
            task = keeper.claim
            if err.kind in BREAKER_KINDS:
                _count_failure(breaker)
            if not _wait_inline(task, err, breaker, keeper, job_id, spec):
                return _failed_attempt(task, job_id, err, err.partial)
            task = with_database(lambda t=task: progress.reclaim(t))
            if task is None:
                return _gone(keeper.claim, job_id)
            keeper.claim = task
            events.claimed(task, job_id)
    task = keeper.claim
    if keeper.hold is not None:
        keeper.hold.used = (usage.prompt_tokens or 0) + (usage.completion_tokens or pieces)
    if not text.strip():
        _count_failure(breaker)
        err = ProviderError("empty_answer", "The model returned an empty answer.", transient=True)
        return _failed_attempt(task, job_id, err, text)
    breaker.success()
    tokens = usage.completion_tokens or pieces
    if not _finish(task, text, usage.prompt_tokens, tokens, usage.finish_reason):
        return _gone(task, job_id)
    events.completed(task, job_id, tokens, seconds, usage.prompt_tokens)
    return "completed"


def _count_failure(breaker: Breaker) -> None:
    if opened := breaker.failure():
        events.circuit_opened(breaker.model, opened)


class _Gone(Exception):
    """The task was cancelled, deleted or taken back while the attempt ran."""


def _stream(keeper: Entry, spec: ModelSpec, job_id: str) -> tuple[str, Usage, int, float]:
    """Stream one provider call into the row; return (text, usage, pieces, seconds).

    Raises ProviderError (with the text so far as `partial`), _Gone, or HandedBack when the
    worker's grace period ran out mid-stream.
    """
    task = keeper.claim
    if drain.draining:
        _hand_back_for_shutdown(task, job_id)
    usage = Usage()
    # The tracker writes the text so far and the progress (the share of the token budget
    # produced, a piece being about a token) from this list, about once a second.
    pieces: list[str] = []
    keeper.pieces, keeper.written = pieces, 0
    started = time.monotonic()
    try:
        for piece in stream_answer(spec, task.prompt, task.params, usage):
            pieces.append(piece)
            if keeper.lost.is_set():
                raise _Gone()
            if drain.expired():
                _hand_back_for_shutdown(task, job_id)
    except ProviderError as err:
        err.partial = "".join(pieces)
        raise
    return "".join(pieces), usage, len(pieces), time.monotonic() - started


def _finish(task: Claim, text: str, prompt_tokens: int | None, tokens: int, finish_reason: str | None) -> bool:
    """Write the answer, waiting for the database; a lost commit reply is recognised."""
    lost_reply = False

    def attempt() -> bool:
        nonlocal lost_reply
        try:
            if progress.complete(task, text, prompt_tokens, tokens, finish_reason):
                return True
        except DBAPIError:
            lost_reply = True
            raise
        return lost_reply and _completed_by(task)

    return with_database(attempt)


def _completed_by(task: Claim) -> bool:
    from webapp.models import Task, TaskStatus

    row = db.session.get(Task, task.task_id, populate_existing=True)
    return row is not None and row.status == TaskStatus.COMPLETED.value and row.attempts == task.attempt


def _wait_inline(
    task: Claim, err: ProviderError, breaker: Breaker, keeper: Entry, job_id: str, spec: ModelSpec
) -> bool:
    """Wait out a short Retry-After in this worker; return whether to start the next attempt now."""
    limit = current_app.config["RETRY_INLINE_MAX_SECONDS"]
    if err.kind != "rate_limited" or err.retry_after is None or err.retry_after > limit:
        return False
    if task.attempt >= task.max_attempts or drain.draining or breaker.remaining() > 0:
        return False
    events.waiting(task, job_id, err, err.retry_after)
    deadline = time.monotonic() + err.retry_after
    while (left := deadline - time.monotonic()) > 0:
        if drain.wait(min(left, 0.5)) or keeper.lost.is_set():
            return False  # shutting down or no longer ours: hand back the usual way
    if not breaker.check().allowed:
        return False
    if keeper.hold is None:
        return True
    # The next call counts against the model's requests and tokens per minute too; its slot is kept.
    budget = task.params.get("max_tokens") or spec.default_max_tokens
    tokens = estimate_tokens(len(task.prompt), task.params.get("system"), budget)
    place = line_place(task.priority, task.task_id)
    verdict, hold = model_limits().acquire(spec, keeper.hold.holder, tokens, task.task_id, place)
    if hold is not None:
        keeper.hold.tokens += hold.tokens
    return verdict.allowed


def _hand_back_for_shutdown(task: Claim, job_id: str) -> None:
    """Give the task back at once, attempt refunded, with a job ready for another worker."""
    try:
        next_job = enqueue_task(task.task_id, task.priority, job_timeout(task.model))
    except RedisError:
        next_job = None  # the sweeper enqueues it
    message = "The worker running this task shut down; it will run again."
    if with_database(lambda: progress.hand_back(task, "shutdown", message, 0, next_job, refund=True)):
        events.handed_back(task, job_id, "shutdown", next_job)
    raise HandedBack()


def _gone(task: Claim, job_id: str) -> str:
    events.stopped(task, job_id)
    return "stopped"


def _failed_attempt(task: Claim, job_id: str, err: ProviderError, text: str) -> str:
    """Hand the task back for a later attempt, or fail it; then tell RQ the attempt failed."""
    if err.transient and task.attempt < task.max_attempts:
        delay = backoff_delay(task.attempt, err.retry_after)
        # Never due while its model's breaker is open: it would only be deferred again.
        delay = max(delay, Breaker(task.model).remaining())
        # The job for the next attempt is created first; if the fenced write then misses (the
        # task was cancelled meanwhile) that job finds nothing to claim and ends quietly.
        try:
            next_job = enqueue_task(task.task_id, task.priority, job_timeout(task.model), delay)
        except RedisError:
            next_job = None  # the sweeper enqueues it once it is due
        message = f"{err.message} Attempt {task.attempt} of {task.max_attempts} failed; retrying in {delay:.0f} s."
        with_database(lambda: progress.hand_back(task, err.kind, message, delay, next_job))
        events.retrying(task, job_id, err, delay, next_job)
    else:
        if err.transient:
            message = f"{err.message} Gave up after {task.attempt} attempts; retry the task later."
        else:
            message = err.message
        with_database(lambda: progress.fail(task, err.kind, message, text))
        events.failed(task, job_id, err.kind)
    raise TaskAttemptError(f"task {task.task_id} attempt {task.attempt}: {err.kind}") from None
