"""Browser pages: sign in, submit, watch an answer grow, history, API tokens. Same services as the API.

Every page is server-rendered HTML that works as plain forms and links; htmx only makes parts of
it live (the task polls its own partial while it runs, History's filters apply as you type).
A request from htmx carries `HX-Request`, and an action answers it with the partial to swap in
instead of a redirect.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal

from flask import (
    Blueprint,
    current_app,
    flash,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import current_user, login_required
from markupsafe import Markup

from .. import bounds, htmx, money, ratelimits
from ..auth import sign_in, sign_out
from ..budgets import answer_tokens
from ..catalog import catalog
from ..errors import BudgetExceededError, ConflictError, RateLimitedError, TaskNotFoundError, ValidationError
from ..models import MAX_ID, TaskStatus
from ..rendering import render_markdown
from ..services import accounts, attempts
from ..services import tasks as service

bp = Blueprint("pages", __name__)

# "Pending", "Processing", … in the order of TaskStatus.
STATUS_LABELS = {status.value: status.value.capitalize() for status in TaskStatus}


@bp.after_request
def no_store(response):
    """Pages show one user's data: no shared cache may keep them, and Back shows them fresh."""
    response.headers.setdefault("Cache-Control", "no-store")
    return htmx.vary(response)


# -- template helpers ----------------------------------------------------------------------


@bp.app_template_filter("markdown")
def markdown_filter(text: str | None) -> Markup:
    return render_markdown(text)


@bp.app_template_filter("when")
def when_filter(value: datetime | None) -> Markup:
    """Render a time as <time>, readable without script; app.js shows it in the reader's zone."""
    if value is None:
        return Markup("")
    utc = value.astimezone(UTC)
    return Markup('<time datetime="{}">{}</time>').format(
        utc.isoformat().replace("+00:00", "Z"), utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    )


@bp.app_template_filter("usd")
def usd_filter(amount) -> str:
    return money.usd(amount)


@bp.app_template_filter("usd_plain")
def usd_plain_filter(amount) -> str:
    """An amount as a person would type it back into a form: 25, 12.5."""
    return f"{Decimal(amount).normalize():f}"


@bp.app_template_filter("fallback_story")
def fallback_story_filter(task) -> str | None:
    """How the task moved along its fallback chain ("local → gpt-4o-mini after 3 × HTTP 500"), or None."""
    return attempts.story(task)


@bp.app_template_filter("duration")
def duration_filter(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def answer_limits(task) -> tuple[int | None, int | None]:
    """Return (the max tokens a task's answer had, the most its model allows); None where unknown."""
    params = task.params or {}
    spec = catalog().get(task.served_by or task.model)
    if spec is None:
        return params.get("max_tokens"), None
    return answer_tokens(spec, params), spec.max_tokens


@bp.app_context_processor
def page_context() -> dict:
    return {
        "status_labels": STATUS_LABELS,
        "statuses": list(STATUS_LABELS),
        "answer_limits": answer_limits,
        "line_place": service.line_place,
        "bounds": bounds,
    }


@bp.get("/favicon.ico")
def favicon():
    """The site's icon where every browser looks for it (pages link to it too)."""
    return current_app.send_static_file("favicon.ico")


# -- signing in and out -------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    """Return a same-site path to go to after signing in (never another host)."""
    # Browsers drop tabs and newlines from URLs and read a backslash as "/": "/<tab>/evil" is "//evil".
    plain = target and all(c.isprintable() and not c.isspace() and c != "\\" for c in target)
    if plain and target.startswith("/") and not target.startswith("//"):
        return target
    return url_for("pages.index")


def _client_address() -> str:
    # With TRUSTED_PROXIES set, ProxyFix has already put the client's address here.
    return request.remote_addr or "-"


def _account_key() -> str:
    # The account page asks for the signed-in user's current password: that account is the one guessed at.
    name = current_user.username if current_user.is_authenticated else request.form.get("username")
    return (name or "").strip().lower()[:100] or "-"


def _login_keys() -> list[tuple[str, ...]]:
    """The failed sign-in counters this attempt is checked against: (setting, *key)."""
    account, address = _account_key(), _client_address()
    return [
        ("LOGIN_LIMIT_PER_ACCOUNT_AND_ADDRESS", account, address),
        ("LOGIN_LIMIT_PER_ACCOUNT", account),
        ("LOGIN_LIMIT_PER_ADDRESS", address),
    ]


def login_throttled() -> int | None:
    """Return the seconds this sign-in attempt must wait, if a failed sign-in limit is used up."""
    waits = [w for setting, *key in _login_keys() if (w := ratelimits.rate_limits().wait(setting, *key))]
    return max(waits) if waits else None


def count_failed_login() -> None:
    for setting, *key in _login_keys():
        ratelimits.rate_limits().hit(setting, *key)


def too_many_attempts(wait: int, template: str = "login.html", **context):
    """Answer a throttled sign-in (or password check) with its form and a plain message (429, Retry-After)."""
    when = f"{wait} seconds" if wait < 120 else f"{math.ceil(wait / 60)} minutes"
    error = f"Too many failed sign-ins. Wait {when} and try again."
    context.setdefault("username", request.form.get("username", ""))
    response = make_response(render_template(template, error=error, **context))
    response.status_code = 429
    response.headers["Retry-After"] = str(wait)
    return response


@bp.route("/login", methods=["GET", "POST"])
def login():
    """Sign in. Failed attempts are counted (see _login_keys); over a limit, sign-in waits."""
    if current_user.is_authenticated:
        return redirect(url_for("pages.index"))
    error = None
    username = ""
    if request.method == "POST":
        wait = login_throttled()
        if wait:
            return too_many_attempts(wait)
        username = request.form.get("username", "").strip()
        user = accounts.authenticate(username, request.form.get("password", ""))
        if user is not None:
            sign_in(user)
            return redirect(_safe_next(request.args.get("next")))
        # Only failures count: signing in successfully costs nothing.
        count_failed_login()
        error = "Wrong username or password."
    return render_template("login.html", error=error, username=username)


@bp.post("/logout")
def logout():
    sign_out()
    flash("You are signed out.", "info")
    return redirect(url_for("pages.login"))


# -- submitting --------------------------------------------------------------------------------


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
        value = float(raw)
    except ValueError:
        errors[name] = "Enter a number, like 0.7."
        return None
    if not math.isfinite(value):
        errors[name] = "Enter a number, like 0.7."
        return None
    return value


def _render_index(
    values: dict | None = None,
    errors: dict | None = None,
    limited: str | None = None,
    source=None,
    over_budget: str | None = None,
):
    cat = catalog()
    return render_template(
        "index.html",
        models=sorted(cat, key=lambda spec: spec.name),
        default_model=cat.default,
        values=values or {},
        errors=errors or {},
        limited=limited,
        over_budget=over_budget,
        source=source,
    )


def _values_of(task) -> dict:
    """Return a task's request as the form's fields; a cut-off answer's max tokens doubled (within the cap)."""
    params = task.params or {}
    values = {"prompt": task.prompt, "model": task.model, "priority": str(task.priority)}
    max_tokens = params.get("max_tokens")
    if task.cut_off:
        limit, cap = answer_limits(task)
        if limit and cap and limit < cap:
            max_tokens = min(limit * 2, cap)
    for name, value in (("max_tokens", max_tokens), ("temperature", params.get("temperature"))):
        if value is not None:
            values[name] = str(value)
    if params.get("system"):
        values["system"] = params["system"]
    return values


@bp.get("/")
@login_required
def index():
    """The submit form; `?from=<id>` fills it in with one of the user's tasks, to edit and submit anew."""
    source = request.args.get("from")
    if source is None:
        return _render_index()
    if not source.isdigit() or not 0 < int(source) <= MAX_ID:
        raise TaskNotFoundError(source[:40])
    task = service.get_task(current_user, int(source))
    return _render_index(_values_of(task), source=task)


@bp.post("/tasks")
@login_required
def submit():
    """Submit the form; on a mistake show the form again with what the user typed."""
    errors: dict[str, str] = {}
    values = request.form.to_dict()
    values.pop("csrf_token", None)
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
        for field, message in (exc.details or {}).items():
            errors.setdefault(field.removeprefix("params."), message)
    if errors:
        # 200, not 422: the form is the answer, and htmx 2 would not swap a 4xx.
        return _render_index(values, errors)
    try:
        task, _ = service.submit(current_user, submission)
    except RateLimitedError as exc:
        # A plain form POST (no htmx): the browser shows the 429's form, everything typed kept.
        response = make_response(_render_index(values, limited=exc.message))
        response.status_code = 429
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except BudgetExceededError as exc:
        # The API's words, beside the button; everything typed kept.
        return _render_index(values, over_budget=exc.message), 402
    return redirect(url_for("pages.task", task_id=task.id), code=303)


# -- one task ----------------------------------------------------------------------------------


@bp.get("/tasks/<id:task_id>")
@login_required
def task(task_id: int):
    return render_template("task.html", task=service.get_task(current_user, task_id))


@bp.get("/tasks/<id:task_id>/live")
@login_required
def task_live(task_id: int):
    """The task's live partial: htmx polls it until the task is finished.

    `seen` is the status the page shows; when it changed, the partial also updates the page's
    screen-reader announcement (out of band), so a change is announced once, not every second.
    """
    task = service.get_task(current_user, task_id)
    return render_template("_task.html", task=task, announce=request.args.get("seen") != task.status)


def _task_action(task_id: int, action, done: str):
    """Run a cancel or retry; answer htmx with the partial, a plain form with a redirect."""
    notice = None
    try:
        task = action(current_user, task_id)
    except (ConflictError, RateLimitedError) as exc:
        notice = exc.message
        task = service.get_task(current_user, task_id)
    if htmx.is_htmx():
        return render_template("_task.html", task=task, announce=True, notice=notice)
    flash(notice or done.format(id=task_id), "error" if notice else "success")
    return redirect(url_for("pages.task", task_id=task_id), code=303)


@bp.post("/tasks/<id:task_id>/cancel")
@login_required
def cancel(task_id: int):
    return _task_action(task_id, service.cancel, "Task {id} is cancelled.")


@bp.post("/tasks/<id:task_id>/retry")
@login_required
def retry(task_id: int):
    return _task_action(task_id, service.retry, "Task {id} is queued again.")


@bp.post("/tasks/<id:task_id>/delete")
@login_required
def delete(task_id: int):
    service.delete_task(current_user, task_id)
    flash(f"Task {task_id} is deleted.", "success")
    return redirect(url_for("pages.history"), code=303)


# -- history -----------------------------------------------------------------------------------


@bp.get("/tasks")
@login_required
def history():
    """The user's tasks, newest first; filters and cursors are query parameters, so links work."""
    filters = {
        "q": request.args.get("q", "").strip(),
        "status": request.args.get("status", ""),
        "model": request.args.get("model", ""),
        "batch": request.args.get("batch", "").strip(),
    }
    error = None
    try:
        page = service.history_page(
            current_user,
            status=filters["status"] or None,
            model=filters["model"] or None,
            search=filters["q"] or None,
            before=request.args.get("before") or None,
            after=request.args.get("after") or None,
            limit=current_app.config["HISTORY_PAGE_SIZE"],
            batch=filters["batch"] or None,
        )
    except ValidationError as exc:
        error = exc.message
        page = service.HistoryPage([], None, None)
    active = {name: value for name, value in filters.items() if value}
    html = render_template(
        "history.html",
        page=page,
        filters=filters,
        active=active,
        error=error,
        paged=bool(request.args.get("before") or request.args.get("after")),
        models=catalog().names(),
    )
    # A refused filter or cursor is a 422 with its message; htmx (filtering as you type) gets a
    # 200, since htmx 2 does not swap a 4xx in.
    return html, 422 if error and not htmx.is_htmx() else 200


@bp.get("/tasks/<id:task_id>/row")
@login_required
def history_row(task_id: int):
    """One History row; an unfinished row polls this until its task finishes."""
    return render_template("_row.html", task=service.get_task(current_user, task_id))


# -- API tokens --------------------------------------------------------------------------------


def _render_tokens(new_token: str | None = None, name: str = "", error: str | None = None):
    return render_template(
        "tokens.html", tokens=accounts.list_tokens(current_user), new_token=new_token, name=name, error=error
    )


@bp.get("/tokens")
@login_required
def tokens():
    return _render_tokens()


@bp.post("/tokens")
@login_required
def create_token():
    """Create a token and show it on this response only: it is never stored or shown again."""
    name = request.form.get("name", "")
    try:
        _, token = accounts.create_token(current_user, name)
    except ValidationError as exc:
        return _render_tokens(name=name, error=exc.message)
    return _render_tokens(new_token=token)


@bp.post("/tokens/<id:token_id>/revoke")
@login_required
def revoke_token(token_id: int):
    accounts.revoke_token(current_user, token_id)
    flash("The token is revoked: scripts using it now get 401.", "success")
    return redirect(url_for("pages.tokens"), code=303)
