"""What admins do: act on many tasks at once by filter, and manage users.

A bulk action is two steps. `preview` counts what a filter matches and notes the highest task
id then; `apply` acts on the same filter, limited to that id, so a task submitted after the
confirmation is never swept in. Tasks that changed meanwhile (a FAILED one retried by its owner)
no longer match and are left alone; the result says how many were acted on.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select

from .. import lifecycle
from ..bounds import MODEL_NAME_MAX
from ..errors import ConflictError, NotFoundError, ValidationError
from ..extensions import db
from ..models import UNFINISHED, Task, TaskStatus, User, utcnow
from ..queues import redis
from . import accounts, sessions, stats
from .tasks import text_problem

log = logging.getLogger(__name__)

ACTIONS = {
    # action: (statuses it applies to, past tense for the result)
    "retry": (lifecycle.REOPENABLE, "retried"),
    "cancel": (UNFINISHED, "cancelled"),
    "delete": (tuple(TaskStatus.__members__), "deleted"),
}
BATCH = 500
# A century: older than that matches every task, and larger values overflow a date.
MAX_AGE_HOURS = 24 * 365 * 100


@dataclass(frozen=True)
class TaskFilter:
    """Which tasks a bulk action is about; empty fields match everything."""

    status: str | None = None
    model: str | None = None
    username: str | None = None
    older_than_hours: float | None = None

    @classmethod
    def parse(cls, form) -> TaskFilter:
        """Read a filter from form fields, or raise ValidationError per field."""
        errors: dict[str, str] = {}
        status = (form.get("status") or "").strip().upper() or None
        if status and status not in TaskStatus.__members__:
            errors["status"] = f"Choose one of {', '.join(TaskStatus.__members__)}."
        model = (form.get("model") or "").strip() or None
        if model and (len(model) > MODEL_NAME_MAX or text_problem(model)):
            errors["model"] = f"Enter a model name of at most {MODEL_NAME_MAX} characters."
        username = (form.get("username") or "").strip() or None
        older = (form.get("older_than_hours") or "").strip()
        hours = None
        if older:
            try:
                hours = float(older)
                if not 0 <= hours <= MAX_AGE_HOURS:  # also refuses nan and inf
                    raise ValueError
            except ValueError:
                errors["older_than_hours"] = f"Enter a number of hours from 0 to {MAX_AGE_HOURS:,}."
        if username and accounts.find_user(username) is None:
            errors["username"] = f"No user named {username!r}."
        if errors:
            raise ValidationError("The filter is not valid: " + " ".join(errors.values()), errors)
        return cls(status, model, username, hours)

    def as_form(self) -> dict[str, str]:
        values = {
            "status": self.status,
            "model": self.model,
            "username": self.username,
            "older_than_hours": None if self.older_than_hours is None else f"{self.older_than_hours:g}",
        }
        return {k: v for k, v in values.items() if v is not None}

    def describe(self) -> str:
        parts = []
        if self.status:
            parts.append(self.status)
        parts.append("tasks")
        if self.model:
            parts.append(f"of model {self.model}")
        if self.username:
            parts.append(f"of user {self.username}")
        if self.older_than_hours is not None:
            parts.append(f"submitted more than {self.older_than_hours:g} hours ago")
        return " ".join(parts)

    def conditions(self, action: str) -> list:
        """Return the WHERE clauses for this filter and what `action` can apply to."""
        allowed = ACTIONS[action][0]
        where = [Task.status.in_(allowed)]
        if self.status:
            where.append(Task.status == self.status)
        if self.model:
            where.append(Task.model == self.model)
        if self.username:
            user = accounts.find_user(self.username)
            where.append(Task.user_id == (user.id if user else -1))
        if self.older_than_hours is not None:
            where.append(Task.created_at < utcnow() - timedelta(hours=self.older_than_hours))
        return where


@dataclass(frozen=True)
class Preview:
    action: str
    filter: TaskFilter
    count: int
    up_to_id: int


def _check_action(action: str) -> None:
    if action not in ACTIONS:
        raise ValidationError(f"Unknown action {action!r}.", {"action": f"one of {', '.join(ACTIONS)}"})


def preview(action: str, task_filter: TaskFilter) -> Preview:
    """Count the tasks `action` would touch now, and the id it stops at."""
    _check_action(action)
    up_to = db.session.scalar(select(func.max(Task.id))) or 0
    count = db.session.scalar(
        select(func.count()).select_from(Task).where(*task_filter.conditions(action), Task.id <= up_to)
    )
    db.session.rollback()
    return Preview(action, task_filter, count or 0, up_to)


def apply(action: str, task_filter: TaskFilter, up_to_id: int) -> int:
    """Do `action` to the tasks matching the filter with ids up to `up_to_id`; return how many."""
    _check_action(action)
    where = [*task_filter.conditions(action), Task.id <= up_to_id]
    done = 0
    last_id = 0
    while True:
        ids = list(db.session.scalars(select(Task.id).where(*where, Task.id > last_id).order_by(Task.id).limit(BATCH)))
        if not ids:
            break
        last_id = ids[-1]
        done += {"retry": _retry, "cancel": _cancel, "delete": _delete}[action](ids, where)
    if action in ("retry", "delete") and done:
        # Old finished tasks left or reopened: cached figures of past hours are stale now.
        stats.forget(redis())
    log.info("admin bulk %s: %s tasks (%s)", action, done, task_filter.describe())
    return done


def _retry(ids: list[int], where: list) -> int:
    return lifecycle.reopen([Task.id.in_(ids), *where])


def _cancel(ids: list[int], where: list) -> int:
    return len(lifecycle.cancel([Task.id.in_(ids), *where], by="admin"))


def _delete(ids: list[int], where: list) -> int:
    return len(lifecycle.delete_tasks([Task.id.in_(ids), *where]))


# Users


def list_users() -> list[User]:
    return list(db.session.scalars(select(User).order_by(func.lower(User.username))))


def _user(user_id: int) -> User:
    user = db.session.get(User, user_id)
    if user is None:
        raise NotFoundError(f"User {user_id} does not exist.")
    return user


def set_active(acting: User, user_id: int, active: bool) -> User:
    """Enable or disable a user. Disabling ends every sign-in for good (enabling revives none);
    their tokens stop working while they are disabled."""
    user = _user(user_id)
    if user.id == acting.id and not active:
        raise ConflictError("You cannot disable your own account.")
    user.is_active = active
    if active:
        db.session.commit()
    else:
        sessions.end_all(user.id)  # commits the flag with the deletions
    return user


def set_admin(acting: User, user_id: int, admin: bool) -> User:
    user = _user(user_id)
    if user.id == acting.id and not admin:
        raise ConflictError("You cannot take away your own administrator rights.")
    user.is_admin = admin
    db.session.commit()
    return user


@dataclass(frozen=True)
class PasswordReset:
    user: User
    password: str  # shown once, never stored in clear
    sessions_ended: int
    tokens_revoked: int


def reset_password(user_id: int, revoke_tokens: bool) -> PasswordReset:
    """Give a user a new random password and end every sign-in; revoke their API tokens if asked."""
    user = _user(user_id)
    password = secrets.token_urlsafe(12)  # 96 random bits: no strength check needed
    user.set_password(password)
    ended = sessions.end_all(user.id)
    revoked = accounts.revoke_all_tokens(user.id) if revoke_tokens else 0
    return PasswordReset(user, password, ended, revoked)
