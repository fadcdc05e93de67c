"""Sign-ins that can be ended: one `user_sessions` row per signed-in browser.

The session cookie (signed by Flask) carries a random 256-bit key; the table keeps only its
SHA-256. Loading the user of a request is one indexed read (the key's row joined with its
user), and a row is touched at most once per SESSION_TOUCH_SECONDS. Deleting rows ends
sign-ins at their next request, wherever the cookie was copied: signing out deletes one,
"sign out everywhere", a password change or reset and disabling the user delete them all
(re-enabling a user brings none back). Rows idle for SESSION_IDLE_DAYS no longer sign anyone
in, and the scheduler deletes them.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from flask import current_app
from sqlalchemy import delete, func, select, update

from ..extensions import db
from ..models import User, UserSession, utcnow


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _idle_cutoff():
    return utcnow() - timedelta(days=current_app.config["SESSION_IDLE_DAYS"])


def start(user: User) -> str:
    """Record a new sign-in of `user`; return its key (for the cookie, never stored)."""
    key = secrets.token_urlsafe(32)
    db.session.add(UserSession(user_id=user.id, key_hash=_hash(key)))
    db.session.commit()
    user.session_key = key
    return key


def user_for(key: str) -> User | None:
    """Return the active user of a live sign-in, or None (ended, idle too long, user disabled)."""
    if not key or len(key) > 100 or not key.isascii():
        return None
    row = db.session.execute(
        select(User, UserSession.id, UserSession.last_seen_at)
        .join(UserSession, UserSession.user_id == User.id)
        .where(UserSession.key_hash == _hash(key), User.is_active, UserSession.last_seen_at > _idle_cutoff())
    ).one_or_none()
    if row is None:
        return None
    user, session_id, last_seen = row
    now = utcnow()
    if now - last_seen > timedelta(seconds=current_app.config["SESSION_TOUCH_SECONDS"]):
        db.session.execute(update(UserSession).where(UserSession.id == session_id).values(last_seen_at=now))
        db.session.commit()
    user.session_key = key
    return user


def end(key: str | None) -> None:
    """End one sign-in (signing out)."""
    if key:
        db.session.execute(delete(UserSession).where(UserSession.key_hash == _hash(key)))
        db.session.commit()


def end_all(user_id: int) -> int:
    """End every sign-in of a user; return how many there were. Commits with the caller's changes."""
    ended = db.session.execute(delete(UserSession).where(UserSession.user_id == user_id)).rowcount
    db.session.commit()
    return ended


def count(user_id: int) -> int:
    """Return how many live sign-ins a user has."""
    return db.session.scalar(
        select(func.count())
        .select_from(UserSession)
        .where(UserSession.user_id == user_id, UserSession.last_seen_at > _idle_cutoff())
    )


def purge_idle() -> int:
    """Delete the rows of sign-ins idle longer than SESSION_IDLE_DAYS; return how many."""
    purged = db.session.execute(delete(UserSession).where(UserSession.last_seen_at <= _idle_cutoff())).rowcount
    db.session.commit()
    return purged
