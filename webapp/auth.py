"""Who is calling: a session login for browsers, an API token for scripts. Never both.

The API accepts only `Authorization: Bearer`; a session cookie is not a credential there, so a
page cannot be tricked into calling the API, and the API needs no CSRF token.

A browser's session cookie names a sign-in (a row of `user_sessions`, webapp/services/sessions.py),
not a user, so signing out ends it for every copy of the cookie. Signing in and out also empty
the session, which gives it a fresh CSRF token: a token read before the change is worthless after.
"""

from __future__ import annotations

from flask import current_app, flash, g, redirect, request, session, url_for
from flask_login import current_user, login_user, logout_user
from sqlalchemy.exc import SQLAlchemyError

from . import htmx
from .extensions import db, login_manager
from .models import User
from .services import sessions
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


@login_manager.user_loader
def load_user(session_key: str) -> User | None:
    """Return the user of the cookie's sign-in; an ended sign-in or a disabled user is signed out."""
    return sessions.user_for(session_key)


def _fresh_session() -> None:
    """Empty the cookie session, CSRF secret included, so nothing from before carries over."""
    session.clear()
    g.pop(current_app.config["WTF_CSRF_FIELD_NAME"], None)  # Flask-WTF's cached token for this request


def sign_in(user: User) -> None:
    """Start a new sign-in for this browser (a new key, a new CSRF token)."""
    _fresh_session()
    sessions.start(user)
    login_user(user)


def sign_out() -> None:
    """End this browser's sign-in for good: a saved copy of the cookie no longer works."""
    if current_user.is_authenticated:
        sessions.end(current_user.session_key)
    logout_user()
    _fresh_session()


@login_manager.unauthorized_handler
def unauthorized():
    flash("Please sign in to continue.", "info")
    if htmx.is_htmx():
        # An htmx poll must not swap the sign-in page into a task: send the whole tab there,
        # coming back to the page it was on.
        current = htmx.current_url()
        back = current.path + (f"?{current.query}" if current.query else "") if current.path else "/"
        return htmx.redirect(url_for("pages.login", next=back))
    return redirect(url_for("pages.login", next=request.full_path if request.query_string else request.path))


def user_or_anonymous() -> None:
    """Load the session's user now; if the database cannot, treat the request as signed out.

    Every page template asks who is signed in. When the database is what failed, an error page
    must still render (without the navigation) rather than fail a second time.
    """
    try:
        current_user.is_authenticated  # noqa: B018 (loads the user)
    except SQLAlchemyError:
        db.session.rollback()
        g._login_user = login_manager.anonymous_user()  # Flask-Login's per-request user slot
