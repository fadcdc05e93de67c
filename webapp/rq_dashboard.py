"""rq-dashboard at /admin/rq, for admins only.

rq-dashboard has no authentication, renders job data unescaped (upstream issue #526) and sends
its actions (delete, requeue, empty, compact) as plain POSTs. So, here:

- every request to its blueprint, static files and JSON included, passes the admin guard first
  (an app-level before_request runs before the blueprint's own hooks);
- its POSTs need our CSRF token like every other form: its script sends the `_csrf_token`
  cookie back as an X-CSRFToken header, so the cookie is set to our token on its pages;
  its one state-changing GET (requeue all) is refused;
- jobs carry a task id only (see webapp/queues.py), so there is no user text to render.

Its actions cannot corrupt a task: PostgreSQL is the record. A deleted job of a PENDING task
is re-enqueued by the sweeper; a requeued job whose task is finished claims nothing and ends.
"""

from __future__ import annotations

import functools
import re

from flask import Flask, Response, abort, current_app, jsonify, request
from flask_login import current_user
from flask_wtf.csrf import generate_csrf
from rq import Queue, Worker
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import requeue_job
from rq.serializers import JSONSerializer

from .auth import login_manager
from .errors import ForbiddenError
from .security import cookie_secure
from .views.errors import CODES, error_response

PREFIX = "/admin/rq"
BLUEPRINT = "rq_dashboard"
CSRF_COOKIE = "_csrf_token"  # the name rq-dashboard's script reads
MAX_PAGE_NUMBER = 1_000_000
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")


def _wants_json() -> bool:
    """Whether the caller is a script or the dashboard's own XHR, which get 401 instead of a redirect."""
    if request.path.endswith(".json") or request.headers.get("X-Requested-With") == "XMLHttpRequest":
        return True
    if "Authorization" in request.headers:
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json"


def guard() -> Response | None:
    """Let only signed-in admins reach rq-dashboard: anonymous → sign in (or 401), others → 403."""
    if request.blueprint != BLUEPRINT:
        return None
    if not current_user.is_authenticated:
        if _wants_json():
            response = jsonify(
                {"error": {"code": "unauthorized", "message": "Sign in as an administrator.", "details": None}}
            )
            response.status_code = 401
            return response
        return login_manager.unauthorized()
    if not current_user.is_admin:
        raise ForbiddenError("This page is for administrators.")
    if request.endpoint == f"{BLUEPRINT}.requeue_all" and request.method != "POST":
        abort(405)  # a GET that changes state would bypass CSRF protection
    args = request.view_args or {}
    # It serves one Redis, instance 0; another number, or page numbers that are not numbers
    # (it parses those itself), would be a 500 rather than a 404.
    if (
        args.get("instance_number", 0) != 0
        or (request.endpoint == f"{BLUEPRINT}.list_jobs" and not _page_numbers_ok(args))
        or ("job_id" in args and not JOB_ID.fullmatch(args["job_id"]))  # RQ raises ValueError on those
    ):
        return _dashboard_error(404, "There is nothing at this address.")
    if request.endpoint == f"{BLUEPRINT}.compact_queue":
        queue = Queue(args.get("queue_name", ""), connection=current_app.extensions["redis"])
        if not queue.connection.exists(queue.key):
            return jsonify(status="OK")  # nothing to compact (RQ would fail renaming a missing key)
    return None


def _page_numbers_ok(args: dict) -> bool:
    values = [str(args.get(name, "")) for name in ("per_page", "page")]
    return all(v.isascii() and v.isdecimal() and 0 < int(v) <= MAX_PAGE_NUMBER for v in values)


def csrf_cookie(response: Response) -> Response:
    """Hand rq-dashboard's script our CSRF token, on its own pages only."""
    if request.blueprint == BLUEPRINT and response.mimetype == "text/html" and current_user.is_authenticated:
        response.set_cookie(
            CSRF_COOKIE,
            generate_csrf(),
            path=PREFIX,
            samesite="Strict",
            secure=cookie_secure(),
            httponly=False,  # its script reads it; it is the same token our forms carry in the page
        )
    return response


def _dashboard_error(status: int, message: str) -> Response:
    """Answer a dashboard request the dashboard cannot serve, as JSON (its script, scripts) or a page."""
    if _wants_json():
        response = jsonify({"error": {"code": CODES[status], "message": message, "details": None}})
        response.status_code = status
        return response
    return error_response(status, message)


def _no_such_job(_exc):
    return _dashboard_error(404, "There is no such job: it finished and expired, or was deleted.")


def _invalid_job_operation(exc):
    return _dashboard_error(409, f"That cannot be done to this job now: {exc}")


class JSONWorker(Worker):
    """RQ's Worker, read with our serializer: rq-dashboard's workers view fetches each busy worker's
    job through `Worker.all()`, which otherwise unpickles it (and fails on JSON with a 500)."""

    @classmethod
    def all(cls, connection=None, job_class=None, queue_class=None, queue=None, serializer=None):
        return super().all(connection, job_class, queue_class, queue, serializer or JSONSerializer)


def init_app(app: Flask) -> None:
    import rq_dashboard
    import rq_dashboard.web as dashboard
    from rq_dashboard.web import setup_rq_connection

    # The same Redis as the app, embedded Valkey socket (unix://) included.
    app.config.setdefault("RQ_DASHBOARD_REDIS_URL", app.config["REDIS_URL"])
    app.config.setdefault("RQ_DASHBOARD_POLL_INTERVAL", 5000)
    # Its default is pickle; our jobs are JSON (and pickle from Redis would be code execution).
    # Its config object covers queues and job details; two more places take no serializer in
    # 0.9 (the workers view and requeue), so they get one here.
    dashboard.config.serializer = JSONSerializer
    dashboard.Worker = JSONWorker
    dashboard.requeue_job = functools.partial(requeue_job, serializer=JSONSerializer)
    app.before_request(guard)
    app.after_request(csrf_cookie)
    # Its views let these out as 500s (an unknown or expired job id, requeueing a job that has not
    # failed): the caller's mistakes, not ours. Only RQ raises them; our services catch their own.
    app.register_error_handler(NoSuchJobError, _no_such_job)
    app.register_error_handler(InvalidJobOperation, _invalid_job_operation)
    app.register_blueprint(rq_dashboard.blueprint, url_prefix=PREFIX)
    setup_rq_connection(app)
