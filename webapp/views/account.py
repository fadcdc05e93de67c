"""The signed-in user's own page: change the password, sign out everywhere."""

from __future__ import annotations

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from ..auth import sign_in, sign_out
from ..errors import ValidationError
from ..services import accounts, sessions
from .pages import count_failed_login, login_throttled, too_many_attempts

bp = Blueprint("account", __name__, url_prefix="/account")


@bp.after_request
def no_store(response):
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def _render(errors: dict | None = None, status: int = 200):
    return (
        render_template("account.html", errors=errors or {}, signed_in=sessions.count(current_user.id)),
        status,
    )


@bp.get("")
@login_required
def index():
    return _render()


@bp.post("/password")
@login_required
def change_password():
    """Change the password (the current one is asked, and counted like a sign-in); every sign-in ends."""
    wait = login_throttled()
    if wait:
        return too_many_attempts(wait, "account.html", errors={}, signed_in=sessions.count(current_user.id))
    new = request.form.get("password", "")
    if new != request.form.get("confirm", ""):
        return _render({"confirm": "The two new passwords are not the same. Type the new one twice."})
    user = current_user._get_current_object()
    try:
        ended = accounts.change_password(user, request.form.get("current_password", ""), new)
    except ValidationError as exc:
        if "current_password" in (exc.details or {}):
            count_failed_login()
        return _render({field: exc.message for field in exc.details or {"password": None}})
    sign_in(user)  # this browser stays signed in, under a new key
    others = ended - 1
    flash(
        "Your password is changed."
        + (f" {others} other {'browser is' if others == 1 else 'browsers are'} signed out." if others > 0 else ""),
        "success",
    )
    return redirect(url_for("account.index"), code=303)


@bp.post("/sign-out-everywhere")
@login_required
def sign_out_everywhere():
    """End every sign-in of this user, this browser's included."""
    ended = sessions.end_all(current_user.id)
    sign_out()
    flash(f"You are signed out everywhere ({ended} {'browser' if ended == 1 else 'browsers'}).", "info")
    return redirect(url_for("pages.login"), code=303)
