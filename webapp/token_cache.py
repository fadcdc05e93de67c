"""API tokens remembered per process, with revocation still immediate in every process.

Looking a token up costs a PostgreSQL round trip (the token joined to its user) on every API
call. Each app keeps the users of the tokens it has seen, keyed by the token's digest, stamped
with the *auth version* read from Redis before the lookup. Any change to a user or a token (a
revocation, a disabled user, a new budget or admin flag; from this process, another one or the
CLI) sets a fresh random version in Redis after its commit, so the next call anywhere reads a
version its entries do not carry and goes back to PostgreSQL. One Redis GET replaces the query.

Why it stays correct:
- the version is read *before* PostgreSQL is, and written *after* the change commits: an entry
  stamped with the current version was read after the last change committed;
- versions are random, never counters: a Redis that lost its data (or was flushed) starts a new
  version, which no entry carries;
- Redis unreachable: the lookup goes to PostgreSQL and the process forgets its entries, so none
  read before an outage is trusted after it;
- an entry is trusted for ENTRY_SECONDS at most, which bounds the one case left: a change whose
  version write failed (Redis cut off from that process alone) while the others still reach it.

Changes are noticed from the ORM session's events (an ORM UPDATE or DELETE of users or tokens, or
a flush that changes or deletes one), so no call site has to remember to say so. A statement that
writes nothing that matters here (the token's `last_used_at`) says so with
`execution_options(auth_unchanged=True)`.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass

from flask import Flask, current_app
from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import event
from sqlalchemy.orm import Session

from .models import ApiToken, User

log = logging.getLogger(__name__)

VERSION_KEY = "atr:auth:version"
ENTRY_SECONDS = 60.0
MAX_ENTRIES = 10_000
_WATCHED = (User, ApiToken)


@dataclass(frozen=True)
class Entry:
    """A token's user (detached, every column loaded) as of `version`."""

    user: User
    token_id: int
    version: str
    loaded_at: float


class TokenCache:
    """One app's remembered tokens (digest -> Entry), shared by its threads."""

    def __init__(self, connection: Redis):
        self.connection = connection
        self.entries: dict[str, Entry] = {}
        self.lock = threading.Lock()

    def version(self) -> str | None:
        """Return the current auth version (starting one if Redis has none), or None if Redis is out of reach."""
        try:
            current = self.connection.get(VERSION_KEY)
            if current is None:
                fresh = secrets.token_hex(8)
                self.connection.set(VERSION_KEY, fresh, nx=True)
                current = self.connection.get(VERSION_KEY)
        except (RedisError, OSError) as exc:
            log.debug("auth version unavailable (%s): tokens are looked up in the database", type(exc).__name__)
            self.entries = {}
            return None
        return current.decode() if isinstance(current, bytes) else current

    def get(self, digest: str, version: str) -> Entry | None:
        entry = self.entries.get(digest)
        if entry is None or entry.version != version or time.monotonic() - entry.loaded_at > ENTRY_SECONDS:
            return None
        return entry

    def put(self, digest: str, user: User, token_id: int, version: str) -> None:
        with self.lock:
            if len(self.entries) >= MAX_ENTRIES:
                self.entries = {}
            self.entries[digest] = Entry(user, token_id, version, time.monotonic())

    def changed(self) -> None:
        """Start a new auth version, so every process looks its tokens up again; never raises."""
        self.entries = {}
        try:
            self.connection.set(VERSION_KEY, secrets.token_hex(8))
        except (RedisError, OSError) as exc:
            log.warning(
                "a user or token changed but the auth version was not updated (Redis: %s); other processes "
                "may accept a revoked token for up to %d s",
                type(exc).__name__,
                ENTRY_SECONDS,
            )


def token_cache() -> TokenCache:
    return current_app.extensions["token_cache"]


def _mark(session: Session) -> None:
    session.info["auth_changed"] = True


def _touches_auth(mappers) -> bool:
    return any(mapper.class_ in _WATCHED for mapper in mappers)


@event.listens_for(Session, "do_orm_execute")
def _on_execute(state) -> None:
    writes = state.is_update or state.is_delete
    if writes and not state.execution_options.get("auth_unchanged") and _touches_auth(state.all_mappers):
        _mark(state.session)


@event.listens_for(Session, "after_flush")
def _on_flush(session: Session, context) -> None:
    if any(isinstance(obj, _WATCHED) for obj in (*session.dirty, *session.deleted)):
        _mark(session)


@event.listens_for(Session, "after_commit")
def _on_commit(session: Session) -> None:
    if session.info.pop("auth_changed", False):
        try:
            cache = current_app.extensions.get("token_cache")
        except RuntimeError:  # no app context: a session outside the app (scripts); nothing cached
            return
        if cache is not None:
            cache.changed()


@event.listens_for(Session, "after_rollback")
def _on_rollback(session: Session) -> None:
    session.info.pop("auth_changed", None)


def init_app(app: Flask) -> None:
    app.extensions["token_cache"] = TokenCache(app.extensions["redis"])
