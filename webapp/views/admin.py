"""Admin pages: the stats page (live), bulk task actions with a confirmation, and users."""

from __future__ import annotations

from flask import Blueprint, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user

from .. import budgets, htmx, money
from ..auth import login_manager, sign_in
from ..catalog import catalog
from ..errors import AppError, ForbiddenError, ValidationError
from ..extensions import db
from ..models import TaskStatus, User, utcnow
from ..services import accounts, stats, usage
from ..services import admin as service
from .forms import flash_refused

bp = Blueprint("admin", __name__, url_prefix="/admin")

REFRESH_SECONDS = 5


@bp.after_request
def no_store(response):
    """Admin pages show everyone's data (and a reset shows a password): no cache may keep them."""
    response.headers.setdefault("Cache-Control", "no-store")
    return response


@bp.app_template_filter("budget_words")
def budget_words(user: User) -> str:
    return budgets.describe_budget(user)


@bp.before_request
def admins_only():
    """Anonymous callers sign in first (htmx polls are told to go there), non-admins get a 403."""
    if not current_user.is_authenticated:
        if htmx.is_htmx():
            # A poll whose session ran out: send the whole page to sign in, not a swapped-in login form.
            return htmx.redirect(url_for("pages.login", next=url_for("admin.index")))
        return login_manager.unauthorized()
    if not current_user.is_admin:
        raise ForbiddenError("This page is for administrators.")
    return None


def _snapshot():
    return stats.snapshot(current_app.extensions["redis"])


def _spend():
    """This month's biggest spenders, for the stats page."""
    month = money.month_of(utcnow())
    return {"month": month, "users": usage.spend_by_user(month)}


@bp.get("")
def index():
    return render_template("admin/stats.html", snap=_snapshot(), spend=_spend(), refresh=REFRESH_SECONDS)


@bp.get("/stats")
def stats_partial():
    """The live part of the stats page; htmx fetches it every few seconds."""
    return render_template("admin/_stats.html", snap=_snapshot(), spend=_spend(), refresh=REFRESH_SECONDS)


def _render_tasks(preview=None, errors=None, values=None, status=200):
    return (
        render_template(
            "admin/tasks.html",
            preview=preview,
            errors=errors or {},
            values=values or {},
            actions=service.ACTIONS,
            statuses=list(TaskStatus.__members__),
            models=sorted(spec.name for spec in catalog()),
        ),
        status,
    )


@bp.get("/tasks")
def tasks():
    return _render_tasks(values={"action": request.args.get("action", "retry")})


@bp.post("/tasks/preview")
def tasks_preview():
    """Count what the action would touch and ask for confirmation."""
    values = request.form.to_dict()
    try:
        task_filter = service.TaskFilter.parse(request.form)
        preview = service.preview(values.get("action", ""), task_filter)
    except ValidationError as exc:
        return _render_tasks(errors=exc.details or {"action": exc.message}, values=values)
    return _render_tasks(preview=preview, values=values)


@bp.post("/tasks/apply")
def tasks_apply():
    """Do the confirmed action, to at most the tasks the confirmation counted."""
    values = request.form.to_dict()
    try:
        task_filter = service.TaskFilter.parse(request.form)
        up_to = int(values.get("up_to_id", ""))
        confirmed = int(values.get("count", ""))
    except ValueError:
        return _render_tasks(errors={"action": "Preview the action again before confirming it."}, values=values)
    except ValidationError as exc:
        return _render_tasks(errors=exc.details or {"action": exc.message}, values=values)
    action = values.get("action", "")
    done = service.apply(action, task_filter, up_to)
    past = service.ACTIONS[action][1]
    message = f"{past.capitalize()} {done} {'task' if done == 1 else 'tasks'} ({task_filter.describe()})."
    if done != confirmed:
        message += f" {confirmed - done} of the {confirmed} confirmed had changed meanwhile and were left alone."
    flash(message, "info")
    return redirect(url_for("admin.tasks", action=action), code=303)


@bp.get("/users")
def users():
    return _users_page()


def _users_page(errors=None, values=None, reset=None, status=200, budget_errors=None):
    db.session.rollback()
    return (
        render_template(
            "admin/users.html",
            users=service.list_users(),
            errors=errors or {},
            values=values or {},
            reset=reset,
            budget_errors=budget_errors or {},
            default_budget=budgets.describe_default(),
        ),
        status,
    )


@bp.post("/users")
def create_user():
    values = request.form.to_dict()
    values.pop("password", None)
    try:
        user = accounts.create_user(
            request.form.get("username", "").strip(),
            request.form.get("password", ""),
            is_admin=request.form.get("is_admin") == "on",
        )
    except AppError as exc:
        return _users_page(errors=dict.fromkeys(exc.details or ("username",), exc.message), values=values)
    flash(f"Created {'admin' if user.is_admin else 'user'} {user.username}.", "info")
    return redirect(url_for("admin.users"), code=303)


@bp.post("/users/<id:user_id>/active")
def set_active(user_id: int):
    with flash_refused(AppError):
        user = service.set_active(current_user, user_id, request.form.get("active") == "1")
        flash(f"{user.username} is {'enabled' if user.is_active else 'disabled'}.", "info")
    return redirect(url_for("admin.users"), code=303)


@bp.post("/users/<id:user_id>/admin")
def set_admin(user_id: int):
    with flash_refused(AppError):
        user = service.set_admin(current_user, user_id, request.form.get("admin") == "1")
        flash(f"{user.username} is {'an administrator' if user.is_admin else 'no longer an administrator'}.", "info")
    return redirect(url_for("admin.users"), code=303)


@bp.post("/users/<id:user_id>/password")
def reset_password(user_id: int):
    """Set a new random password and show it once, on this response only (never in a cookie)."""
    reset = service.reset_password(user_id, revoke_tokens=request.form.get("revoke_tokens") == "on")
    if reset.user.id == current_user.id:
        sign_in(reset.user)  # one's own reset ended this sign-in too: carry on under a new one
    return _users_page(reset=reset)


@bp.post("/users/<id:user_id>/budget")
def set_budget(user_id: int):
    """Set a user's monthly budget; a bad amount shows the page again with the message by that user."""
    text = request.form.get("budget", "")
    try:
        user = budgets.set_budget(db.get_or_404(User, user_id), text)
    except ValidationError as exc:
        return _users_page(budget_errors={user_id: (text, exc.message)})
    flash(f"{user.username}'s monthly budget is {budgets.describe_budget(user)}.", "info")
    return redirect(url_for("admin.users"), code=303)
