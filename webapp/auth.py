"""Who is calling: a session login for browsers, an API token for scripts. Never both.

The API accepts only `Authorization: Bearer`; a session cookie is not a credential there, so a
page cannot be tricked into calling the API, and the API needs no CSRF token.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import flash, g, make_response, redirect, request, url_for
from flask_login import current_user
from sqlalchemy.exc import SQLAlchemyError

from .extensions import db, login_manager
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


@login_manager.user_loader
def load_user(user_id: str) -> User | None:
    """Return the signed-in user; a disabled user is signed out at their next request."""
    user = db.session.get(User, int(user_id)) if user_id.isdigit() else None
    return user if user is not None and user.is_active else None


@login_manager.unauthorized_handler
def unauthorized():
    flash("Please sign in to continue.", "info")
    if request.headers.get("HX-Request") == "true":
        # An htmx poll must not swap the sign-in page into a task: send the whole tab there,
        # coming back to the page it was on.
        current = urlsplit(request.headers.get("HX-Current-URL", ""))
        back = current.path + (f"?{current.query}" if current.query else "") if current.path else "/"
        response = make_response("", 401)
        response.headers["HX-Redirect"] = url_for("pages.login", next=back)
        return response
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
