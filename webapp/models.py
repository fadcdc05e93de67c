"""The record: users, their sessions and API tokens, their tasks and idempotency keys."""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime
from decimal import Decimal

from flask_login import UserMixin
from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship
from werkzeug.security import check_password_hash, generate_password_hash

from . import money
from .bounds import IDEMPOTENCY_KEY_MAX, MODEL_NAME_MAX, PRIORITY_MAX, PRIORITY_MIN
from .extensions import db
from .money import Amount, Budget, Price

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a bigint identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")
# The largest row id, on PostgreSQL (bigint) and SQLite (a 64-bit INTEGER) alike: an id from a
# URL or a cursor past it is refused before any query (SQLite's driver cannot even bind one).
MAX_ID = 2**63 - 1
JsonDoc = JSON().with_variant(JSONB(), "postgresql")
# Passwords are hashed with scrypt (memory-hard; werkzeug's default, named here so it never changes
# silently): "scrypt:32768:8:1$salt$hash". Hashes of another method are upgraded at sign-in.
PASSWORD_METHOD = "scrypt"


def utcnow() -> datetime:
    """Return the current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """A timestamp stored as UTC and always read back timezone-aware (SQLite forgets zones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        if value is not None and dialect.name == "sqlite":
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class TaskStatus(enum.StrEnum):
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


UNFINISHED = (TaskStatus.PENDING.value, TaskStatus.PROCESSING.value)
FINISHED = (TaskStatus.COMPLETED.value, TaskStatus.FAILED.value, TaskStatus.CANCELLED.value)


def sql_in(values) -> str:
    """Return `('A', 'B')` for a CHECK or an index's WHERE, from the statuses above."""
    return "(" + ", ".join(f"'{value}'" for value in values) + ")"


# Failures another attempt of the same request cannot mend (the provider refused the request,
# it does not fit the model's context, the model is unknown): the request itself must change.
NEEDS_EDIT_KINDS = frozenset({"invalid_request", "context_length", "unknown_model", "not_found"})


class User(UserMixin, db.Model):
    __tablename__ = "users"
    # Names are unique ignoring case, so "Admin" cannot shadow "admin".
    __table_args__ = (Index("ix_users_username_lower", text("lower(username)"), unique=True),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    is_admin: Mapped[bool] = mapped_column(default=False, server_default=text("false"))
    is_active: Mapped[bool] = mapped_column(default=True, server_default=text("true"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The monthly budget in US dollars. While budget_is_default, DEFAULT_MONTHLY_BUDGET_USD
    # applies; otherwise monthly_budget_usd does, and NULL there means no limit.
    budget_is_default: Mapped[bool] = mapped_column(default=True, server_default=text("true"))
    monthly_budget_usd: Mapped[Decimal | None] = mapped_column(Budget)

    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user", cascade="all, delete-orphan")

    # The key of the sign-in this object was loaded for (webapp/services/sessions.py), not a
    # column: Flask-Login keeps it in the session cookie instead of the user id.
    session_key = None  # unannotated: SQLAlchemy maps annotated attributes

    def get_session_key(self) -> str:
        """Return what Flask-Login stores in the cookie (its `id_attribute`)."""
        if not self.session_key:
            raise RuntimeError("sign in through webapp.auth.sign_in, which starts a session")
        return self.session_key

    def set_password(self, password: str) -> None:
        self.password_hash = generate_password_hash(password, method=PASSWORD_METHOD)

    def check_password(self, password: str) -> bool:
        return check_password_hash(self.password_hash, password)

    def password_needs_rehash(self) -> bool:
        return not self.password_hash.startswith(PASSWORD_METHOD + ":")

    def budget(self, default: Decimal | None) -> Decimal | None:
        """Return the user's monthly budget in dollars (None: no limit), given the configured default."""
        return default if self.budget_is_default else self.monthly_budget_usd

    def __repr__(self) -> str:
        return f"<User {self.id} {self.username}>"


class ApiToken(db.Model):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    # The first characters of the token, shown so users can tell tokens apart.
    prefix: Mapped[str] = mapped_column(String(16))
    # SHA-256 of the whole token; the token itself is shown once and never stored.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    user: Mapped[User] = relationship(back_populates="tokens")


class UserSession(db.Model):
    """A signed-in browser. Its cookie carries a random key; only the key's SHA-256 is kept here,
    so deleting the row ends that sign-in wherever the cookie is copied to."""

    __tablename__ = "user_sessions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Written at most once per SESSION_TOUCH_SECONDS, so a page view stays one read.
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Task(db.Model):
    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint(
            f"status IN {sql_in(TaskStatus)}",
            name="status",
        ),
        CheckConstraint(f"priority BETWEEN {PRIORITY_MIN} AND {PRIORITY_MAX}", name="priority"),
        CheckConstraint("progress BETWEEN 0 AND 100", name="progress"),
        # History and API lists: a user's tasks newest first, optionally by status.
        Index("ix_tasks_user_id_id", "user_id", "id"),
        Index("ix_tasks_user_id_status_id", "user_id", "status", "id"),
        # The sweeper's scan: only unfinished rows are indexed, so it stays small.
        Index(
            "ix_tasks_unfinished",
            "status",
            "run_after",
            postgresql_where=text(f"status IN {sql_in(UNFINISHED)}"),
            sqlite_where=text(f"status IN {sql_in(UNFINISHED)}"),
        ),
        Index("ix_tasks_finished_at", "finished_at"),
        # Stats (counts by status, charts) and the retention cleanup: finished tasks by status and time.
        Index("ix_tasks_status_finished_at", "status", "finished_at"),
        # A batch's counts by status, and its output and error files in line order.
        Index(
            "ix_tasks_batch_id_status_id",
            "batch_id",
            "status",
            "id",
            postgresql_where=text("batch_id IS NOT NULL"),
            sqlite_where=text("batch_id IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    prompt: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(MODEL_NAME_MAX))
    priority: Mapped[int] = mapped_column(SmallInteger, default=5)
    # Generation parameters as submitted: max_tokens, temperature, system.
    params: Mapped[dict] = mapped_column(JsonDoc, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=TaskStatus.PENDING.value)
    progress: Mapped[int] = mapped_column(SmallInteger, default=0)
    result: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    # A short class for the last error (rate_limited, timeout, provider, invalid_request, ...).
    error_kind: Mapped[str | None] = mapped_column(String(32))
    # Claims so far; each claim is one provider call and fences that attempt's writes.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    # Why the answer ended, as the provider said: "stop", or "length" when max_tokens cut it.
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    # The catalog model that answered (differs from `model` after a fallback), the prices it
    # charged then (dollars per million tokens), and the answer's cost at those prices.
    served_by: Mapped[str | None] = mapped_column(String(MODEL_NAME_MAX))
    usd_per_million_input_tokens: Mapped[Decimal | None] = mapped_column(Price)
    usd_per_million_output_tokens: Mapped[Decimal | None] = mapped_column(Price)
    cost_usd: Mapped[Decimal | None] = mapped_column(Amount)
    # The most the task can cost, held against its owner's budget in the usage row of
    # `reserved_month` while the task is unfinished (webapp/budgets.py).
    reserved_usd: Mapped[Decimal | None] = mapped_column(Amount)
    reserved_month: Mapped[date | None] = mapped_column(Date)
    # The model of its fallback chain the task runs on now; NULL while it is still on `model`.
    active_model: Mapped[str | None] = mapped_column(String(MODEL_NAME_MAX))
    # The RQ job of the latest enqueue; only the sweeper and cancellation look at it.
    job_id: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A PENDING task waiting for a retry is not due before this time.
    run_after: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # A batch line's task: its batch, the line's custom_id and its line number in the input file.
    # The line's whole chat, when it has more than one message, is params["messages"].
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    custom_id: Mapped[str | None] = mapped_column(String(512))
    batch_line: Mapped[int | None] = mapped_column(Integer)

    user: Mapped[User] = relationship()

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED

    @property
    def needs_edit(self) -> bool:
        """Whether the task failed in a way only a changed prompt, model or max tokens can mend."""
        return self.status == TaskStatus.FAILED.value and self.error_kind in NEEDS_EDIT_KINDS

    @property
    def cut_off(self) -> bool:
        """Whether the answer is complete only up to max_tokens (the provider said "length")."""
        return self.status == TaskStatus.COMPLETED.value and self.finish_reason == "length"

    @property
    def usage(self) -> dict | None:
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}

    def to_dict(self) -> dict:
        """Return the task as the API shows it."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "model": self.model,
            "priority": self.priority,
            "params": {k: v for k, v in (self.params or {}).items() if k != "messages"},
            "status": self.status,
            "progress": self.progress,
            "result": self.result,
            "error": self.error,
            "attempts": self.attempts,
            "usage": self.usage,
            "finish_reason": self.finish_reason,
            "served_by": self.served_by,
            "cost_usd": money.as_json(self.cost_usd),
            "batch_id": self.batch_id,
            "custom_id": self.custom_id,
            "messages": (self.params or {}).get("messages"),
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "updated_at": _iso(self.updated_at),
        }

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.status}>"


class TaskAttempt(db.Model):
    """A provider call of a task that did not answer: which model, and what went wrong.

    The answering call is the task's `served_by`; with these the task page tells the story
    ("local → gpt-4o-mini after 3 × HTTP 500").
    """

    __tablename__ = "task_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    # The task's attempt number then (a move on from an open circuit breaker spends none).
    attempt: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(MODEL_NAME_MAX))
    # The error class (provider_error, timeout, rate_limited, context_length, circuit_open, ...)
    # and a few words for people ("HTTP 500").
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(String(200))
    # Whether this attempt moved the task on to the next model of its chain.
    fell_back: Mapped[bool] = mapped_column(default=False, server_default=text("false"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class UsageMonth(db.Model):
    """A user's spend and held reservations in one month: what budgets are enforced and reported from."""

    __tablename__ = "usage_months"
    __table_args__ = (Index("ix_usage_months_month", "month"),)

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    # The first day of the month (UTC).
    month: Mapped[date] = mapped_column(Date, primary_key=True)
    spent_usd: Mapped[Decimal] = mapped_column(Amount, default=money.ZERO, server_default=text("0"))
    reserved_usd: Mapped[Decimal] = mapped_column(Amount, default=money.ZERO, server_default=text("0"))


class UsageDay(db.Model):
    """What a user's answers of one model cost on one day (UTC); it outlives the tasks themselves."""

    __tablename__ = "usage_days"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    # The model that answered (served_by).
    model: Mapped[str] = mapped_column(String(MODEL_NAME_MAX), primary_key=True)
    tasks: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    cost_usd: Mapped[Decimal] = mapped_column(Amount, default=money.ZERO, server_default=text("0"))


class IdempotencyKey(db.Model):
    """An Idempotency-Key a user sent with a submission, and the task it created."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("user_id", "key", name="uq_idempotency_keys_user_id_key"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(IDEMPOTENCY_KEY_MAX))
    # SHA-256 of the canonical request body: the same key with another body is refused.
    request_hash: Mapped[str] = mapped_column(String(64))
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
