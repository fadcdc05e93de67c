"""What users do with tasks: submit, read, list, cancel, retry, delete. Pages and API both call these."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import timedelta

from flask import current_app
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from .. import lifecycle
from ..bounds import (
    LIST_MAX,
    MODEL_NAME_MAX,
    PRIORITY_DEFAULT,
    PRIORITY_MAX,
    PRIORITY_MIN,
    SEARCH_MAX_CHARS,
    SYSTEM_MAX_CHARS,
)
from ..catalog import ModelSpec, catalog
from ..errors import ConflictError, RateLimitedError, TaskNotFoundError, ValidationError
from ..extensions import db
from ..models import MAX_ID, IdempotencyKey, Task, TaskStatus, User, utcnow
from ..ratelimits import rate_limits
from ..text import text_problem  # noqa: F401 (pages and services import it from here)
from ..tokens import context_problem

log = logging.getLogger(__name__)

# Retry-After for a user at MAX_TASKS_IN_FLIGHT: tasks usually finish within seconds.
IN_FLIGHT_RETRY_AFTER = 10


@dataclass(frozen=True)
class Submission:
    """A validated request to run a prompt."""

    prompt: str
    model: str
    priority: int
    params: dict

    def fingerprint(self) -> str:
        """Return a hash of the request, to tell a replay from a different body."""
        body = json.dumps([self.prompt, self.model, self.priority, self.params], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(body.encode()).hexdigest()


def validate_submission(
    prompt: str,
    model: str | None = None,
    priority: int | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    system: str | None = None,
) -> Submission:
    """Check a submission against the limits and the catalog; raise ValidationError per field."""
    errors: dict[str, str] = {}
    limit = current_app.config["PROMPT_MAX_CHARS"]
    if not prompt or not prompt.strip():
        errors["prompt"] = "Enter a prompt."
    elif len(prompt) > limit:
        errors["prompt"] = f"The prompt has {len(prompt):,} characters; the limit is {limit:,}."
    elif problem := text_problem(prompt):
        errors["prompt"] = f"The prompt {problem}."

    cat = catalog()
    name = model or cat.default
    spec: ModelSpec | None = cat.get(name)
    if spec is None:
        errors["model"] = f"Unknown model {name!r}. Available: {', '.join(cat.names())}."

    if priority is None:
        priority = PRIORITY_DEFAULT
    elif not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        errors["priority"] = "Priority must be between 1 (lowest) and 10 (highest)."

    params: dict = {}
    if max_tokens is not None:
        cap = spec.max_tokens if spec else None
        if max_tokens < 1:
            errors["params.max_tokens"] = "max_tokens must be at least 1."
        elif cap is not None and max_tokens > cap:
            errors["params.max_tokens"] = f"max_tokens for {name} is at most {cap}."
        params["max_tokens"] = max_tokens
    if temperature is not None:
        if not 0 <= temperature <= 2:
            errors["params.temperature"] = "temperature must be between 0 and 2."
        params["temperature"] = temperature
    if system is not None and system != "":
        if len(system) > SYSTEM_MAX_CHARS:
            errors["params.system"] = f"The system prompt is limited to {SYSTEM_MAX_CHARS:,} characters."
        elif problem := text_problem(system):
            errors["params.system"] = f"The system prompt {problem}."
        params["system"] = system

    if spec is not None and not errors:
        # Refused only when no model of the chain fits: a fallback with a larger context may answer.
        problems = [context_problem(each, prompt, params) for each in cat.chain(name) or [spec]]
        if all(problems):
            errors["prompt"] = problems[0]
    if errors:
        raise ValidationError("The task was not accepted: " + " ".join(errors.values()), errors)
    return Submission(prompt=prompt, model=name, priority=priority, params=params)


@dataclass(frozen=True)
class LinePlace:
    """Where a PENDING task waits for its model: tasks ahead of it, and the model's slots in use."""

    model: str
    ahead: int
    in_use: int
    concurrency: int


def line_place(task: Task) -> LinePlace | None:
    """Return the task's place in its model's line (jobs/limits.py), or None when it is not waiting in one."""
    spec = catalog().get(task.model)
    if task.status != TaskStatus.PENDING.value or spec is None or not spec.concurrency:
        return None
    from jobs.limits import model_limits

    try:
        limits = model_limits()
        ahead = limits.ahead_of(spec.name, task.id)
        if ahead is None:
            return None
        return LinePlace(spec.name, ahead, limits.in_flight(spec.name), spec.concurrency)
    except RedisError:
        return None  # the page says "waiting" without the detail


def submit(user: User, submission: Submission, idempotency_key: str | None = None) -> tuple[Task, bool]:
    """Record a task as PENDING, commit, then enqueue it. Return (task, created).

    With an Idempotency-Key the same key and body return the first task (created is False).
    The per-user limits hold: the in-flight cap guards the insert itself, and a submission is
    counted against the per-minute limit only once it fits under the cap (before the commit).
    """
    fingerprint = submission.fingerprint() if idempotency_key else None
    if idempotency_key:
        existing = _replay(user, idempotency_key, fingerprint)
        if existing is not None:
            return existing, False  # a replay is free: it runs nothing
    limited = current_app.config["RATELIMIT_ENABLED"]
    cap = max(current_app.config["MAX_TASKS_IN_FLIGHT"], 0) if limited else 0
    try:
        task = lifecycle.submit(
            user,
            submission.prompt,
            submission.model,
            submission.priority,
            submission.params,
            idempotency=(idempotency_key, fingerprint) if idempotency_key else None,
            in_flight_cap=cap,
            admit=(lambda: _count_submission(user)) if limited else None,
        )
    except lifecycle.AtCapacityError:
        raise _at_capacity(cap) from None
    except IntegrityError:
        # Another request with the same key won the race: answer as it did.
        existing = _replay(user, idempotency_key, fingerprint) if idempotency_key else None
        if existing is None:
            raise
        return existing, False
    return task, True


def check_limits(user: User) -> None:
    """Refuse new work over the user's limits (RateLimitedError): tasks in flight, then submissions per minute.

    The in-flight count is a soft cap: two submissions racing at the cap can both pass.
    (A submission checks both inside its insert's transaction instead: `submit`.)
    """
    config = current_app.config
    if not config["RATELIMIT_ENABLED"]:
        return
    cap = config["MAX_TASKS_IN_FLIGHT"]
    if cap > 0:
        counted = db.session.execute(lifecycle.commands.IN_FLIGHT, {"user_id": user.id, "cap": cap})
        if counted.scalar_one() >= cap:
            raise _at_capacity(cap)
    _count_submission(user)


def _at_capacity(cap: int) -> RateLimitedError:
    return RateLimitedError(
        f"You have {cap:,} unfinished tasks, the most allowed at once. "
        "Wait for some to finish (or cancel some), then submit again.",
        IN_FLIGHT_RETRY_AFTER,
        {"tasks_in_flight": cap, "limit": cap},
    )


def _count_submission(user: User) -> None:
    """Count a submission against SUBMIT_LIMIT (shared in Redis); raise RateLimitedError past it."""
    config = current_app.config
    wait = rate_limits().hit("SUBMIT_LIMIT", str(user.id))
    if wait:
        raise RateLimitedError(
            f"Too many submissions (the limit is {config['SUBMIT_LIMIT']}). Try again in {wait} seconds.",
            wait,
            {"limit": config["SUBMIT_LIMIT"], "retry_after": wait},
        )


def _replay(user: User, key: str, fingerprint: str) -> Task | None:
    """Return the task an unexpired Idempotency-Key made, refusing a different body."""
    row = db.session.scalar(select(IdempotencyKey).where(IdempotencyKey.user_id == user.id, IdempotencyKey.key == key))
    if row is None:
        return None
    ttl = timedelta(hours=current_app.config["IDEMPOTENCY_TTL_HOURS"])
    task = db.session.get(Task, row.task_id)
    if row.created_at < utcnow() - ttl or task is None:
        db.session.delete(row)
        db.session.commit()
        return None
    if row.request_hash != fingerprint:
        raise ValidationError(
            "This Idempotency-Key was already used with a different request body. Use a new key for a new request.",
            {"Idempotency-Key": "reused with a different body"},
        )
    return task


def _scoped(user: User):
    """Return a select of the tasks `user` may see: their own, or all for admins."""
    query = select(Task)
    if not user.is_admin:
        query = query.where(Task.user_id == user.id)
    return query


def get_task(user: User, task_id: int) -> Task:
    """Return one task the user may see, or raise TaskNotFoundError."""
    task = db.session.scalar(_scoped(user).where(Task.id == task_id))
    if task is None:
        raise TaskNotFoundError(task_id)
    return task


def encode_cursor(task_id: int) -> str:
    return base64.urlsafe_b64encode(f"id:{task_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """Return the task id a cursor points after, or raise ValidationError."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, value = raw.partition(":")
        # A forged cursor may name any number: one past a row id's range never reaches a query.
        if kind != "id" or not (value.isascii() and value.isdigit() and 1 <= int(value) <= MAX_ID):
            raise ValueError(raw)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValidationError(
            "The cursor is not valid; use next_cursor from a previous page.",
            {"cursor": "not a cursor this API returned"},
        ) from None


def _filtered(user: User, status: str | None, model: str | None, search: str | None, batch: str | None = None):
    """Return a select of the user's own tasks matching the filters; raise ValidationError for a bad status."""
    if status is not None and status not in TaskStatus.__members__:
        raise ValidationError(f"Unknown status {status!r}.", {"status": f"one of {', '.join(TaskStatus.__members__)}"})
    query = select(Task).where(Task.user_id == user.id)
    if status:
        query = query.where(Task.status == status)
    if model:
        if len(model) > MODEL_NAME_MAX or text_problem(model):
            raise ValidationError("Choose a model from the list.", {"model": "not a model name"})
        query = query.where(Task.model == model)
    if search:
        if len(search) > SEARCH_MAX_CHARS or text_problem(search):
            raise ValidationError(
                f"Search for 1-{SEARCH_MAX_CHARS} characters of plain text.", {"search": "not searchable text"}
            )
        escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(Task.prompt.ilike(f"%{escaped}%", escape="\\"))
    if batch:
        if len(batch) > 40 or text_problem(batch):
            raise ValidationError("That is not a batch id.", {"batch": "not a batch id"})
        query = query.where(Task.batch_id == batch)
    return query


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= LIST_MAX:
        raise ValidationError(f"limit must be between 1 and {LIST_MAX}.", {"limit": f"1 to {LIST_MAX}"})


def list_tasks(
    user: User,
    status: str | None = None,
    limit: int = 20,
    cursor: str | None = None,
    model: str | None = None,
    search: str | None = None,
) -> tuple[list[Task], str | None]:
    """Return the user's own tasks newest first, and the cursor of the next page (or None)."""
    _check_limit(limit)
    query = _filtered(user, status, model, search)
    if cursor:
        query = query.where(Task.id < decode_cursor(cursor))
    rows = list(db.session.scalars(query.order_by(Task.id.desc()).limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], next_cursor


@dataclass(frozen=True)
class HistoryPage:
    """One page of a user's tasks, newest first, with cursors to the pages on either side."""

    items: list[Task]
    older: str | None
    newer: str | None


def history_page(
    user: User,
    status: str | None = None,
    model: str | None = None,
    search: str | None = None,
    before: str | None = None,
    after: str | None = None,
    limit: int = 20,
    batch: str | None = None,
) -> HistoryPage:
    """Return the page of tasks just older than `before`, just newer than `after`, or the newest.

    Keyset pagination both ways: a page is found through the (user_id, id) index however deep
    it is, and tasks submitted meanwhile do not shift the pages.
    """
    _check_limit(limit)
    query = _filtered(user, status, model, search, batch)
    if after:
        pivot = decode_cursor(after)
        rows = list(db.session.scalars(query.where(Task.id > pivot).order_by(Task.id.asc()).limit(limit + 1)))
        more_newer = len(rows) > limit
        items = list(reversed(rows[:limit]))
    else:
        query_page = query.where(Task.id < decode_cursor(before)) if before else query
        rows = list(db.session.scalars(query_page.order_by(Task.id.desc()).limit(limit + 1)))
        items = rows[:limit]
        more_newer = bool(items) and before is not None and _exists(query.where(Task.id > items[0].id))
    if not items:
        return HistoryPage([], None, None)
    more_older = _exists(query.where(Task.id < items[-1].id)) if after else len(rows) > limit
    return HistoryPage(
        items,
        older=encode_cursor(items[-1].id) if more_older else None,
        newer=encode_cursor(items[0].id) if more_newer else None,
    )


def _exists(query) -> bool:
    return db.session.scalar(select(query.exists())) or False


def cancel(user: User, task_id: int) -> Task:
    """Cancel a PENDING or PROCESSING task; a running worker notices at its next write."""
    task = get_task(user, task_id)
    cancelled = lifecycle.cancel([Task.id == task.id], by="user")
    db.session.refresh(task)
    if not cancelled:
        raise ConflictError(f"Task {task.id} is already {task.status} and cannot be cancelled.")
    return task


def retry(user: User, task_id: int) -> Task:
    """Run a FAILED or CANCELLED task again, with a fresh set of attempts (a submission for the limits)."""
    task = get_task(user, task_id)
    if task.status in lifecycle.REOPENABLE:
        check_limits(user)
    reopened = lifecycle.reopen([Task.id == task.id])
    db.session.refresh(task)
    if not reopened:
        raise ConflictError(f"Task {task.id} is {task.status}; only FAILED or CANCELLED tasks can be retried.")
    return task


def delete_task(user: User, task_id: int) -> None:
    """Delete a task, cancelling it first if it is still running."""
    task = get_task(user, task_id)
    lifecycle.delete_tasks([Task.id == task.id])
