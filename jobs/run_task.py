"""What a worker runs for a task: claim it, stream the answer into the row, finish it once.

Every way an attempt can end leads to one fenced write: COMPLETED, FAILED, or back to PENDING
with the job that will run it next. What else can happen, and what it does:

- the model is unavailable (its circuit breaker is open, its retryable errors used up its share
  of attempts, it asks to wait longer than the task can, or the prompt does not fit it) and
  its fallback chain has a next model: the task moves on to that model (`attempts.fall_back`),
  which is not a failure; the attempt history (`task_attempts`) keeps each call's model;
- the model's circuit breaker is open and no model is left to fall back to: the task is
  deferred until it half-opens, unclaimed (no attempt spent, no provider call); so is a task
  over the model's requests or tokens per minute, until the limit allows it;
- the model's calls in flight are at its `concurrency`: the task waits in the model's line, its
  job ended, until a freed slot is handed to it (`wake`);
- 429 with a short Retry-After: the worker waits it out and starts the next attempt in place;
  a long one hands the task back with a delayed retry;
- the worker is asked to stop: the attempt finishes within the grace period or hands back
  (attempt refunded);
- the database goes away: the stream goes on, progress writes are skipped, and the final
  write waits for the database (jobs.outage.with_database); nothing fails for it.

The status changes themselves are `webapp/lifecycle/attempts.py`.
"""

from __future__ import annotations

import contextlib
import random
import time

from flask import current_app
from rq import get_current_job
from rq.timeouts import JobTimeoutException
from sqlalchemy.exc import DBAPIError

from webapp.catalog import ModelSpec, catalog
from webapp.extensions import db
from webapp.lifecycle import attempts, enqueue
from webapp.lifecycle.attempts import SHUT_DOWN, Claim, Note
from webapp.tokens import fits

from . import events
from .breaker import Breaker
from .limits import Hold, estimate_tokens, line_place, model_limits
from .outage import database_unavailable, with_database
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


# What `_admit` returns when the task moved on to its next model: admit it again, on that one.
MOVED_ON = object()


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
    while True:  # once per model of the fallback chain at most: each pass moves along it
        pending = with_database(lambda: attempts.pending_task(task_id))
        if pending is None:
            events.skipped(task_id, label)
            return "skipped"
        spec = catalog().get(pending.model)
        hold = None
        if spec is None:
            break
        hold = _admit(task_id, job_id, label, spec, pending)
        if hold is None:
            return "waiting"
        if hold is not MOVED_ON:
            break
    try:
        return _run_claimed(task_id, job_id, label, spec, hold)
    finally:
        if hold is not None:
            wake(spec, model_limits().release(hold, hold.used))


def _admit(task_id: int, job_id: str | None, label: str, spec: ModelSpec, pending: attempts.Pending) -> Hold | None:
    """Take a place under the model's limits and past its breaker, or leave the task waiting (None).

    MOVED_ON when the model is unavailable (the prompt does not fit it, its breaker is open)
    and the task moved on to the next model of its chain.
    """
    nxt = next_model(pending.asked or pending.model, spec.name)
    if nxt and spec.context_window and not _fits(task_id, spec, pending.params):
        note = Note(spec.name, "context_length", "prompt too long")
        return MOVED_ON if _move_on(task_id, spec.name, nxt, note, label, job_id=job_id) else None
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
        if nxt:
            note = Note(spec.name, "circuit_open", "circuit open")
            return MOVED_ON if _move_on(task_id, spec.name, nxt, note, label, job_id=job_id) else None
        wait, reason = breaker.wait, "circuit open"
    elif verdict.limit == "concurrency":
        events.in_line(task_id, label, spec.name)
        return None
    else:
        wait, reason = verdict.wait, f"{verdict.limit} limit"
    delay = wait + random.uniform(0, 1)  # spread the waiting tasks out
    new_job = with_database(lambda: attempts.defer(task_id, job_id, pending.priority, spec.name, delay))
    events.paused(task_id, label, spec.name, delay, new_job, reason)
    return None


def _fits(task_id: int, spec: ModelSpec, params: dict) -> bool:
    """Return whether the prompt and its longest answer fit the model's context window (as at submit)."""
    prompt = with_database(lambda: attempts.prompt_of(task_id))
    if prompt is None:
        return True  # gone: the claim finds nothing
    return fits(spec, prompt, params)


def next_model(asked: str, runs_on: str) -> str | None:
    """Return the model after `runs_on` in the fallback chain of `asked`, or None at its end."""
    names = [spec.name for spec in catalog().chain(asked)]
    if runs_on not in names:
        return None  # the catalog changed under the task: it stays where it is
    index = names.index(runs_on) + 1
    return names[index] if index < len(names) else None


def unavailable(task: Claim, err: ProviderError, breaker: Breaker) -> bool:
    """Return whether this failure makes the task's model unavailable to it (so it falls back).

    The prompt does not fit the model; or a retryable error that used up the model's share of
    attempts, opened its breaker, or came with a Retry-After longer than the task waits for a
    model (RETRY_MAX_SECONDS, or RETRY_INLINE_MAX_SECONDS when that is longer). A permanent
    error (a 400 not about the context, a refused key) is the request's fault: no other model
    would do better.
    """
    if err.kind == "context_length":
        return True
    if not err.transient:
        return False
    config = current_app.config
    longest = max(config["RETRY_MAX_SECONDS"], config["RETRY_INLINE_MAX_SECONDS"])
    if err.retry_after is not None and err.retry_after > longest:
        return True
    return task.attempt >= task.max_attempts or breaker.remaining() > 0


def _why(task: Claim, err: ProviderError) -> str:
    """The attempt history's words for a failure that moved the task on."""
    if err.kind == "context_length":
        return "prompt too long"
    if err.retry_after is not None and err.retry_after > current_app.config["RETRY_MAX_SECONDS"]:
        return f"{err.short}, asked to wait {err.retry_after:g} s"
    return err.short


def _move_on(task_id: int, runs_on: str, to: str, note: Note, label: str, **fence) -> bool:
    """Move the task on to the next model of its chain (not a failure); return whether it moved."""
    moved = with_database(lambda: attempts.fall_back(task_id, runs_on, to, note, **fence))
    if moved:
        events.fell_back(task_id, label, runs_on, to, note.kind, note.detail)
    return moved


def _fall_back(task: Claim, err: ProviderError, breaker: Breaker, job_id: str) -> str | None:
    """Move the task on when this failure makes its model unavailable and a next model exists.

    Returns how the attempt ended ("fell_back", or "stopped" when the task was no longer
    ours), or None: no fallback, handle the failure as usual.
    """
    nxt = next_model(task.chain_head, task.model)
    if nxt is None or not unavailable(task, err, breaker):
        return None
    note = Note(task.model, err.kind, _why(task, err))
    if _move_on(task.task_id, task.model, nxt, note, job_id, attempt=task.attempt):
        return "fell_back"
    return _gone(task, job_id)


def wake(spec: ModelSpec, woken: tuple[int, ...]) -> None:
    """Enqueue the tasks that freed slots went to; a task no longer waiting passes its slot on."""
    left = list(woken)
    while left:
        task_id = left.pop(0)
        if not with_database(lambda task_id=task_id: attempts.wake(task_id)):
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
            found = attempts.claim(task_id, job_id)
        except DBAPIError:
            lost_reply = True
            raise
        if found is None and lost_reply and job_id:
            return attempts.claimed_by(task_id, job_id)
        return found

    return with_database(attempt)


def _crashed(task: Claim, job_id: str, exc: BaseException) -> str:
    events.crashed(task, job_id)
    with contextlib.suppress(DBAPIError):
        attempts.fail(
            task,
            "internal",
            "The worker hit an internal error. Retry the task; if it keeps failing, tell an operator.",
            note=Note(task.model, "internal", "internal error"),
        )
    kind = type(exc).__name__
    raise TaskAttemptError(f"task {task.task_id} attempt {task.attempt}: internal error ({kind})") from None


def _attempt(keeper: Entry, spec: ModelSpec | None, job_id: str) -> str:
    task = keeper.claim
    if spec is None:
        with_database(
            lambda: attempts.fail(
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
            if moved := _fall_back(task, err, breaker, job_id):
                return moved
            if not _wait_inline(task, err, breaker, keeper, job_id, spec):
                return _failed_attempt(task, job_id, err, err.partial)
            note = Note(task.model, err.kind, err.short)
            task = with_database(lambda t=task, n=note: attempts.reclaim(t, n))
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
        return _fall_back(task, err, breaker, job_id) or _failed_attempt(task, job_id, err, text)
    breaker.success()
    tokens = usage.completion_tokens or pieces
    if not _finish(task, text, usage.prompt_tokens, tokens, usage.finish_reason):
        return _gone(task, job_id)
    events.completed(task, job_id, tokens, seconds, usage.prompt_tokens, spec.cost(usage.prompt_tokens, tokens))
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
            if attempts.complete(task, text, prompt_tokens, tokens, finish_reason):
                return True
        except DBAPIError:
            lost_reply = True
            raise
        return lost_reply and attempts.completed_by(task)

    return with_database(attempt)


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
    next_job = enqueue(task.task_id, task.priority, task.model, why="handed back")
    message = SHUT_DOWN + attempts.RUNS_AGAIN
    if with_database(lambda: attempts.hand_back(task, "shutdown", message, 0, next_job, refund=True)):
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
        next_job = enqueue(task.task_id, task.priority, task.model, delay, why="handed back")
        message = f"{err.message} Attempt {task.attempt} of {task.max_attempts} failed; retrying in {delay:.0f} s."
        note = Note(task.model, err.kind, err.short)
        with_database(lambda: attempts.hand_back(task, err.kind, message, delay, next_job, note=note))
        events.retrying(task, job_id, err, delay, next_job)
    else:
        if err.transient:
            message = f"{err.message} Gave up after {task.attempt} attempts; retry the task later."
        else:
            message = err.message
        note = Note(task.model, err.kind, err.short)
        with_database(lambda: attempts.fail(task, err.kind, message, text, note=note))
        events.failed(task, job_id, err.kind)
    raise TaskAttemptError(f"task {task.task_id} attempt {task.attempt}: {err.kind}") from None
