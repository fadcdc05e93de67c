"""Browser pages: sign in, submit a prompt, watch its answer grow. Same services as the API."""

from __future__ import annotations

from flask import Blueprint, redirect, render_template, request, url_for
from flask_login import current_user, login_required, login_user, logout_user

from ..catalog import catalog
from ..errors import ValidationError
from ..services import accounts
from ..services import tasks as service

bp = Blueprint("pages", __name__)


def _safe_next(target: str | None) -> str:
    """Return a same-site path to go to after signing in (never another host)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("pages.index")


@bp.route("/login", methods=["GET", "POST"])
def login():
    if current_user.is_authenticated:
        return redirect(url_for("pages.index"))
    error = None
    username = ""
    if request.method == "POST":
        username = request.form.get("username", "").strip()
        user = accounts.authenticate(username, request.form.get("password", ""))
        if user is not None:
            login_user(user)
            return redirect(_safe_next(request.args.get("next")))
        error = "Wrong username or password."
    return render_template("login.html", error=error, username=username)


@bp.post("/logout")
def logout():
    logout_user()
    return redirect(url_for("pages.login"))


def _form_int(name: str, errors: dict) -> int | None:
    raw = request.form.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        errors[name] = "Enter a whole number."
        return None


def _form_float(name: str, errors: dict) -> float | None:
    raw = request.form.get(name, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        errors[name] = "Enter a number."
        return None


def _render_index(values: dict | None = None, errors: dict | None = None):
    cat = catalog()
    return render_template(
        "index.html",
        models=sorted(cat, key=lambda spec: spec.name),
        default_model=cat.default,
        values=values or {},
        errors=errors or {},
    )


@bp.get("/")
@login_required
def index():
    return _render_index()


@bp.post("/tasks")
@login_required
def submit():
    """Submit the form; on a mistake show the form again with what the user typed."""
    errors: dict[str, str] = {}
    values = request.form.to_dict()
    priority = _form_int("priority", errors)
    max_tokens = _form_int("max_tokens", errors)
    temperature = _form_float("temperature", errors)
    try:
        submission = service.validate_submission(
            request.form.get("prompt", ""),
            model=request.form.get("model") or None,
            priority=priority,
            max_tokens=max_tokens,
            temperature=temperature,
            system=request.form.get("system") or None,
        )
    except ValidationError as exc:
        errors.update({field.removeprefix("params."): message for field, message in (exc.details or {}).items()})
    if errors:
        return _render_index(values, errors)
    task, _ = service.submit(current_user, submission)
    return redirect(url_for("pages.task", task_id=task.id), code=303)


@bp.get("/tasks/<int:task_id>")
@login_required
def task(task_id: int):
    return render_template("task.html", task=service.get_task(current_user, task_id))


@bp.get("/tasks/<int:task_id>/live")
@login_required
def task_live(task_id: int):
    """The task's live partial: htmx polls it until the task is finished."""
    return render_template("_task.html", task=service.get_task(current_user, task_id))
