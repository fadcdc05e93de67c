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


# What `Attempt._admit` decided: go on to the claim; leave the task waiting (its job ends); or
# admit it again, on the next model of its chain it moved on to.
ADMITTED, WAITING, MOVED_ON = "admitted", "waiting", "moved_on"


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
    return Attempt(task_id, job.id if job else None).run()


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


def wake(spec: ModelSpec, woken: tuple[int, ...]) -> None:
    """Enqueue the tasks that freed slots went to; a task no longer waiting passes its slot on."""
    left = list(woken)
    while left:
        task_id = left.pop(0)
        if not with_database(lambda task_id=task_id: attempts.wake(task_id)):
            left.extend(model_limits().unreserve(spec.name, spec.concurrency or 0, task_id))


def _count_failure(breaker: Breaker) -> None:
    if opened := breaker.failure():
        events.circuit_opened(breaker.model, opened)


class _Gone(Exception):
    """The task was cancelled, deleted or taken back while the attempt ran."""


class Attempt:
    """One job's run of a task, from the read before its claim to its one final write.

    It holds what every step needs: the task id; the RQ job id (None outside a worker) and the
    label log lines carry for it; the model's spec; the place it holds under the model's limits
    (`hold`); and, once claimed, its tracker entry: the claim and the pieces streamed so far.
    Each method is one step; the status changes themselves are `webapp.lifecycle.attempts`.
    """

    def __init__(self, task_id: int, job_id: str | None):
        self.task_id = task_id
        self.job_id = job_id
        self.label = job_id or "-"
        self.spec: ModelSpec | None = None
        self.hold: Hold | None = None
        self.entry: Entry | None = None

    @property
    def claim(self) -> Claim:
        """The claim the attempt runs under now (waiting out a short Retry-After renews it)."""
        assert self.entry is not None, "not claimed yet"
        return self.entry.claim

    def run(self) -> str:
        """Admit, claim, stream and finish the task; return how it ended."""
        while True:  # once per model of the fallback chain at most: each pass moves along it
            pending = with_database(lambda: attempts.pending_task(self.task_id))
            if pending is None:
                events.skipped(self.task_id, self.label)
                return "skipped"
            self.spec = catalog().get(pending.model)
            self.hold = None
            if self.spec is None:
                break
            admitted = self._admit(pending)
            if admitted == WAITING:
                return "waiting"
            if admitted == ADMITTED:
                break
        try:
            return self._run_claimed()
        finally:
            if self.hold is not None:
                wake(self.spec, model_limits().release(self.hold, self.hold.used))

    # --- before the claim ----------------------------------------------------------------------

    def _admit(self, pending: attempts.Pending) -> str:
        """Take a place under the model's limits and past its breaker (ADMITTED, `hold` set).

        WAITING when the task was left waiting (in the model's line, or deferred); MOVED_ON when
        the model is unavailable (the prompt does not fit it, its breaker is open) and the task
        moved on to the next model of its chain.
        """
        spec = self.spec
        nxt = next_model(pending.asked or pending.model, spec.name)
        if nxt and spec.context_window and not self._fits(pending.params):
            note = Note(spec.name, "context_length", "prompt too long")
            return MOVED_ON if self._move_on(spec.name, nxt, note, job_id=self.job_id) else WAITING
        budget = pending.params.get("max_tokens") or spec.default_max_tokens
        tokens = estimate_tokens(pending.prompt_chars, pending.params.get("system"), budget)
        place = line_place(pending.priority, self.task_id)
        holder = self.job_id or f"task-{self.task_id}"
        verdict, hold = model_limits().acquire(spec, holder, tokens, self.task_id, place, pending.user_id)
        wake(spec, verdict.woken)
        if verdict.allowed:
            breaker = Breaker(spec.name).check(probe_seconds=spec.timeout)
            if breaker.allowed:
                self.hold = hold
                return ADMITTED
            wake(spec, model_limits().release(hold))
            if nxt:
                note = Note(spec.name, "circuit_open", "circuit open")
                return MOVED_ON if self._move_on(spec.name, nxt, note, job_id=self.job_id) else WAITING
            wait, reason = breaker.wait, "circuit open"
        elif verdict.limit == "concurrency":
            events.in_line(self.task_id, self.label, spec.name)
            return WAITING
        else:
            wait, reason = verdict.wait, f"{verdict.limit} limit"
        delay = wait + random.uniform(0, 1)  # spread the waiting tasks out
        new_job = with_database(lambda: attempts.defer(self.task_id, self.job_id, pending.priority, spec.name, delay))
        events.paused(self.task_id, self.label, spec.name, delay, new_job, reason)
        return WAITING

    def _fits(self, params: dict) -> bool:
        """Return whether the prompt and its longest answer fit the model's context window (as at submit)."""
        prompt = with_database(lambda: attempts.prompt_of(self.task_id))
        if prompt is None:
            return True  # gone: the claim finds nothing
        return fits(self.spec, prompt, params)

    def _move_on(self, runs_on: str, to: str, note: Note, **fence) -> bool:
        """Move the task on to the next model of its chain (not a failure); return whether it moved."""
        moved = with_database(lambda: attempts.fall_back(self.task_id, runs_on, to, note, **fence))
        if moved:
            events.fell_back(self.task_id, self.label, runs_on, to, note.kind, note.detail)
        return moved

    # --- claimed -------------------------------------------------------------------------------

    def _run_claimed(self) -> str:
        """Claim the task and run it to one final write, whatever goes wrong on the way."""
        claim = self._claim()
        if claim is None:
            events.skipped(self.task_id, self.label)
            return "skipped"
        events.claimed(claim, self.label)
        budget = claim.params.get("max_tokens") or (self.spec.default_max_tokens if self.spec else 1)
        running = tracker(current_app._get_current_object())
        self.entry = running.add(claim, budget, self.hold)
        try:
            return self._answer()
        except TaskAttemptError:
            raise
        except JobTimeoutException:
            err = ProviderError("timeout", "The attempt ran past the worker's time limit.", transient=True)
            return self._failed(err, "")
        except DBAPIError as exc:
            db.session.rollback()
            if database_unavailable(exc):
                # The database stayed away longer than DB_RETRY_SECONDS. Leave the task
                # PROCESSING: its lease runs out and the sweeper hands it back. Never mark it
                # failed for this.
                events.database_lost(self.claim, self.label)
                # Not the DBAPIError itself: RQ keeps exception text in Redis, and it names the
                # SQL's values (the answer).
                raise TaskAttemptError(f"task {self.task_id} attempt {self.claim.attempt}: database error") from None
            return self._crashed(exc)
        except Exception as exc:
            return self._crashed(exc)
        finally:
            running.remove(self.entry)

    def _claim(self) -> Claim | None:
        """Claim the task, waiting out a database restart; a lost commit reply is recognised."""
        lost_reply = False

        def claim() -> Claim | None:
            nonlocal lost_reply
            try:
                found = attempts.claim(self.task_id, self.job_id)
            except DBAPIError:
                lost_reply = True
                raise
            if found is None and lost_reply and self.job_id:
                return attempts.claimed_by(self.task_id, self.job_id)
            return found

        return with_database(claim)

    def _answer(self) -> str:
        """Call the model until it answers or the attempt ends another way; return how it ended."""
        spec = self.spec
        if spec is None:
            claim = self.claim
            with_database(
                lambda: attempts.fail(
                    claim,
                    "unknown_model",
                    f"The model {claim.model!r} is no longer offered. Submit the prompt again with another model.",
                )
            )
            events.failed(claim, self.label, "unknown_model")
            return "failed"
        breaker = Breaker(self.claim.model)
        while True:
            try:
                text, usage, pieces, seconds = self._stream()
                break
            except _Gone:
                return self._gone()
            except HandedBack:
                return "handed_back"
            except ProviderError as err:
                if err.kind in BREAKER_KINDS:
                    _count_failure(breaker)
                if moved := self._fall_back(err, breaker):
                    return moved
                if not self._wait_inline(err, breaker):
                    return self._failed(err, err.partial)
                claim = self.claim
                note = Note(claim.model, err.kind, err.short)
                again = with_database(lambda c=claim, n=note: attempts.reclaim(c, n))
                if again is None:
                    return self._gone()
                self.entry.claim = again
                events.claimed(again, self.label)
        if self.hold is not None:
            self.hold.used = (usage.prompt_tokens or 0) + (usage.completion_tokens or pieces)
        if not text.strip():
            _count_failure(breaker)
            err = ProviderError("empty_answer", "The model returned an empty answer.", transient=True)
            return self._fall_back(err, breaker) or self._failed(err, text)
        breaker.success()
        tokens = usage.completion_tokens or pieces
        if not self._finish(text, usage.prompt_tokens, tokens, usage.finish_reason):
            return self._gone()
        cost = spec.cost(usage.prompt_tokens, tokens)
        events.completed(self.claim, self.label, tokens, seconds, usage.prompt_tokens, cost)
        return "completed"

    def _stream(self) -> tuple[str, Usage, int, float]:
        """Stream one provider call into the row; return (text, usage, pieces, seconds).

        Raises ProviderError (with the text so far as `partial`), _Gone, or HandedBack when the
        worker's grace period ran out mid-stream.
        """
        entry, claim = self.entry, self.claim
        if drain.draining:
            self._hand_back_for_shutdown()
        usage = Usage()
        # The tracker writes the text so far and the progress (the share of the token budget
        # produced, a piece being about a token) from this list, about once a second.
        pieces: list[str] = []
        entry.pieces, entry.written = pieces, 0
        started = time.monotonic()
        try:
            for piece in stream_answer(self.spec, claim.prompt, claim.params, usage):
                pieces.append(piece)
                if entry.lost.is_set():
                    raise _Gone()
                if drain.expired():
                    self._hand_back_for_shutdown()
        except ProviderError as err:
            err.partial = "".join(pieces)
            raise
        return "".join(pieces), usage, len(pieces), time.monotonic() - started

    def _wait_inline(self, err: ProviderError, breaker: Breaker) -> bool:
        """Wait out a short Retry-After in this worker; return whether to start the next attempt now."""
        claim = self.claim
        limit = current_app.config["RETRY_INLINE_MAX_SECONDS"]
        if err.kind != "rate_limited" or err.retry_after is None or err.retry_after > limit:
            return False
        if claim.attempt >= claim.max_attempts or drain.draining or breaker.remaining() > 0:
            return False
        events.waiting(claim, self.label, err, err.retry_after)
        deadline = time.monotonic() + err.retry_after
        while (left := deadline - time.monotonic()) > 0:
            if drain.wait(min(left, 0.5)) or self.entry.lost.is_set():
                return False  # shutting down or no longer ours: hand back the usual way
        if not breaker.check().allowed:
            return False
        if self.hold is None:
            return True
        # The next call counts against the model's requests and tokens per minute too; its slot is kept.
        budget = claim.params.get("max_tokens") or self.spec.default_max_tokens
        tokens = estimate_tokens(len(claim.prompt), claim.params.get("system"), budget)
        place = line_place(claim.priority, claim.task_id)
        verdict, hold = model_limits().acquire(self.spec, self.hold.holder, tokens, claim.task_id, place)
        if hold is not None:
            self.hold.tokens += hold.tokens
        return verdict.allowed

    # --- how an attempt ends -------------------------------------------------------------------

    def _finish(self, text: str, prompt_tokens: int | None, tokens: int, finish_reason: str | None) -> bool:
        """Write the answer, waiting for the database; a lost commit reply is recognised."""
        claim = self.claim
        lost_reply = False

        def complete() -> bool:
            nonlocal lost_reply
            try:
                if attempts.complete(claim, text, prompt_tokens, tokens, finish_reason):
                    return True
            except DBAPIError:
                lost_reply = True
                raise
            return lost_reply and attempts.completed_by(claim)

        return with_database(complete)

    def _fall_back(self, err: ProviderError, breaker: Breaker) -> str | None:
        """Move the task on when this failure makes its model unavailable and a next model exists.

        Returns how the attempt ended ("fell_back", or "stopped" when the task was no longer
        ours), or None: no fallback, handle the failure as usual.
        """
        claim = self.claim
        nxt = next_model(claim.chain_head, claim.model)
        if nxt is None or not unavailable(claim, err, breaker):
            return None
        note = Note(claim.model, err.kind, _why(claim, err))
        if self._move_on(claim.model, nxt, note, attempt=claim.attempt):
            return "fell_back"
        return self._gone()

    def _hand_back_for_shutdown(self) -> None:
        """Give the task back at once, attempt refunded, with a job ready for another worker."""
        claim = self.claim
        next_job = enqueue(claim.task_id, claim.priority, claim.model, why="handed back")
        message = SHUT_DOWN + attempts.RUNS_AGAIN
        if with_database(lambda: attempts.hand_back(claim, "shutdown", message, 0, next_job, refund=True)):
            events.handed_back(claim, self.label, "shutdown", next_job)
        raise HandedBack()

    def _gone(self) -> str:
        events.stopped(self.claim, self.label)
        return "stopped"

    def _failed(self, err: ProviderError, text: str) -> str:
        """Hand the task back for a later attempt, or fail it; then tell RQ the attempt failed."""
        claim = self.claim
        note = Note(claim.model, err.kind, err.short)
        if err.transient and claim.attempt < claim.max_attempts:
            delay = backoff_delay(claim.attempt, err.retry_after)
            # Never due while its model's breaker is open: it would only be deferred again.
            delay = max(delay, Breaker(claim.model).remaining())
            # The job for the next attempt is created first; if the fenced write then misses (the
            # task was cancelled meanwhile) that job finds nothing to claim and ends quietly.
            next_job = enqueue(claim.task_id, claim.priority, claim.model, delay, why="handed back")
            tried = f"Attempt {claim.attempt} of {claim.max_attempts} failed"
            message = f"{err.message} {tried}; retrying in {delay:.0f} s."
            with_database(lambda: attempts.hand_back(claim, err.kind, message, delay, next_job, note=note))
            events.retrying(claim, self.label, err, delay, next_job)
        else:
            if err.transient:
                message = f"{err.message} Gave up after {claim.attempt} attempts; retry the task later."
            else:
                message = err.message
            with_database(lambda: attempts.fail(claim, err.kind, message, text, note=note))
            events.failed(claim, self.label, err.kind)
        raise TaskAttemptError(f"task {claim.task_id} attempt {claim.attempt}: {err.kind}") from None

    def _crashed(self, exc: BaseException) -> str:
        claim = self.claim
        events.crashed(claim, self.label)
        with contextlib.suppress(DBAPIError):
            attempts.fail(
                claim,
                "internal",
                "The worker hit an internal error. Retry the task; if it keeps failing, tell an operator.",
                note=Note(claim.model, "internal", "internal error"),
            )
        kind = type(exc).__name__
        raise TaskAttemptError(f"task {claim.task_id} attempt {claim.attempt}: internal error ({kind})") from None
