"""Users, their passwords and their API tokens."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import timedelta
from functools import cache

from sqlalchemy import func, inspect, select, update
from sqlalchemy.orm import joinedload, make_transient_to_detached
from werkzeug.security import check_password_hash, generate_password_hash
from zxcvbn import zxcvbn

from ..errors import ConflictError, NotFoundError, ValidationError
from ..extensions import db
from ..models import PASSWORD_METHOD, ApiToken, User, utcnow
from ..token_cache import token_cache
from . import sessions

USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PASSWORD_MIN = 8
PASSWORD_MAX = 1000
# zxcvbn's 0-4: 3 is "safely unguessable" (about 10^10 guesses), out of reach of an online
# attack and expensive offline against scrypt.
PASSWORD_MIN_SCORE = 3
# zxcvbn's cost grows fast with length; a password this long is strong if its start is.
PASSWORD_SCORED_CHARS = 100
PASSWORD_ADVICE = "Add another word or two; uncommon words are better. A short sentence is easy to remember."
TOKEN_PREFIX = "atr_"
# last_used_at is written at most this often per token, so reads stay reads.
TOKEN_TOUCH_INTERVAL = timedelta(minutes=1)


def validate_password(password: str, username: str = "") -> None:
    """Refuse a password that is short, blank or easy to guess, saying what to do instead."""
    if not password.strip():
        raise ValidationError(f"A password cannot be only spaces. {PASSWORD_ADVICE}", {"password": "only spaces"})
    if len(password) < PASSWORD_MIN:
        raise ValidationError(
            f"The password must have at least {PASSWORD_MIN} characters. {PASSWORD_ADVICE}",
            {"password": f"at least {PASSWORD_MIN} characters"},
        )
    if len(password) > PASSWORD_MAX:
        raise ValidationError(
            f"The password must have at most {PASSWORD_MAX:,} characters.",
            {"password": f"at most {PASSWORD_MAX:,} characters"},
        )
    verdict = zxcvbn(password[:PASSWORD_SCORED_CHARS], user_inputs=[username, "admin", "task", "runner"])
    if verdict["score"] < PASSWORD_MIN_SCORE:
        warning = verdict["feedback"]["warning"] or "It would be guessed quickly."
        raise ValidationError(
            f"This password is too easy to guess: {warning.rstrip('.')}. {PASSWORD_ADVICE}",
            {"password": "too easy to guess"},
        )


def set_password(user: User, password: str) -> int:
    """Give a user a new password and end every sign-in they have; return how many ended."""
    validate_password(password, user.username)
    user.set_password(password)
    return sessions.end_all(user.id)  # commits the new hash with the deletions


def change_password(user: User, current: str, new: str) -> int:
    """Change one's own password, which needs the current one; end every sign-in."""
    if not user.check_password(current):
        raise ValidationError("The current password is not right.", {"current_password": "wrong password"})
    if new == current:
        raise ValidationError("Choose a password other than the current one.", {"password": "unchanged"})
    return set_password(user, new)


def create_user(username: str, password: str, is_admin: bool = False) -> User:
    """Create a user; raise ValidationError for a bad name or password, ConflictError if taken."""
    if not USERNAME.fullmatch(username or ""):
        raise ValidationError(
            "A username is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.",
            {"username": "invalid"},
        )
    validate_password(password, username)
    if find_user(username) is not None:
        raise ConflictError(f"The username {username!r} is taken.")
    user = User(username=username, is_admin=is_admin)
    user.set_password(password)
    db.session.add(user)
    db.session.commit()
    return user


def find_user(username: str) -> User | None:
    """Return the user with this name, ignoring case."""
    if not USERNAME.fullmatch(username or ""):
        return None  # no user has such a name (and PostgreSQL refuses NUL characters in a query)
    return db.session.scalar(select(User).where(func.lower(User.username) == username.lower()))


def authenticate(username: str, password: str) -> User | None:
    """Return the active user with these credentials, or None."""
    user = find_user(username)
    if user is None:
        # Hash anyway, so the answer takes as long as for a real name: timing tells no names.
        check_password_hash(_dummy_hash(), password)
        return None
    if not user.check_password(password) or not user.is_active:
        return None
    if user.password_needs_rehash():
        user.set_password(password)  # hashed by an older method: bring it up to date while we have it
        db.session.commit()
    return user


@cache
def _dummy_hash() -> str:
    return generate_password_hash(secrets.token_urlsafe(16), method=PASSWORD_METHOD)


def ensure_first_admin() -> str | None:
    """Create the user `admin` with a random password if there are no users; return the password."""
    if db.session.scalar(select(func.count()).select_from(User)):
        return None
    password = secrets.token_urlsafe(12)
    create_user("admin", password, is_admin=True)
    return password


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(user: User, name: str) -> tuple[ApiToken, str]:
    """Create an API token for `user`; return the row and the token, which is never stored."""
    name = (name or "").strip()
    if not name or len(name) > 100 or not name.isprintable():
        raise ValidationError("Give the token a name of 1-100 printable characters.", {"name": "1-100 characters"})
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)  # 256 bits
    row = ApiToken(user_id=user.id, name=name, prefix=token[: len(TOKEN_PREFIX) + 6], token_hash=_hash(token))
    db.session.add(row)
    db.session.commit()
    return row, token


def user_for_token(token: str) -> User | None:
    """Return the active user owning an unrevoked token, or None.

    Tokens carry 256 random bits and only their SHA-256 is stored, so a leaked table gives no
    token away. The lookup compares digests: its timing can tell an attacker about the digest of
    their guess, never about a real token; the final comparison is constant-time all the same.
    A token seen lately is answered from this process's memory while the auth version in Redis
    says nothing changed since (webapp/token_cache.py): a revocation anywhere is seen at once.
    """
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200 or not token.isascii():
        return None
    digest = _hash(token)
    cache = token_cache()
    version = cache.version()
    entry = cache.get(digest, version) if version else None
    if entry is not None:
        return db.session.merge(entry.user, load=False)  # no query: the remembered row, in this session
    row = db.session.scalar(select(ApiToken).options(joinedload(ApiToken.user)).where(ApiToken.token_hash == digest))
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        return None
    if row.revoked_at is not None or not row.user.is_active:
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > TOKEN_TOUCH_INTERVAL:
        touch = update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=now)
        db.session.execute(touch.execution_options(auth_unchanged=True))
        db.session.commit()
    if version:
        cache.put(digest, _detached_copy(row.user), row.id, version)
    return row.user


def _detached_copy(user: User) -> User:
    """Return a copy of a loaded user that belongs to no session, to be merged into later ones."""
    copy = User(**{attr.key: getattr(user, attr.key) for attr in inspect(User).column_attrs})
    make_transient_to_detached(copy)
    return copy


def list_tokens(user: User) -> list[ApiToken]:
    return list(
        db.session.scalars(
            select(ApiToken)
            .where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
            .order_by(ApiToken.id.desc())
        )
    )


def revoke_token(user: User, token_id: int) -> None:
    """Revoke one of the user's tokens; raise NotFoundError if it is not theirs."""
    result = db.session.execute(
        update(ApiToken)
        .where(ApiToken.id == token_id, ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    db.session.commit()
    if result.rowcount == 0:
        raise NotFoundError(f"Token {token_id} does not exist or is not yours.")


def revoke_all_tokens(user_id: int) -> int:
    """Revoke every token of a user; return how many."""
    result = db.session.execute(
        update(ApiToken).where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    db.session.commit()
    return result.rowcount
