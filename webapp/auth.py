"""Who is calling: API tokens for scripts (sessions for browsers come with the pages)."""

from __future__ import annotations

from flask import request

from .models import User
from .services.accounts import user_for_token


def bearer_token() -> str | None:
    """Return the token of an `Authorization: Bearer` header, or None. Never from the URL."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def api_user() -> User | None:
    """Return the user of the request's bearer token; cookies are not credentials here."""
    token = bearer_token()
    return user_for_token(token) if token else None
