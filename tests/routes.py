"""Every route of the app and who may call it, and the callers that try it (tests/test_authz.py).

ROUTES is the table the authorization matrix, the CSRF tests and the page fuzzer
(tests/test_fuzz.py) are driven by: a route added to the app needs an entry here.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from sqlalchemy import select

from tests.helpers import ApiClient, csrf_from, login, make_user, task_row
from webapp import outbox
from webapp.extensions import db
from webapp.models import User, utcnow
from webapp.services import accounts, batches, files
from webapp.services.webhooks import new_secret
from webapp.webhook_models import WebhookDelivery, WebhookEndpoint

ROLES = ("anonymous", "user", "other", "disabled", "admin")
OK, LOGIN = "ok", "login"  # ok: 2xx/3xx that is not a trip to the sign-in page; login: sent to sign in (or 401)

PUBLIC = dict.fromkeys(ROLES, OK)
PAGE = {"anonymous": LOGIN, "user": OK, "other": OK, "disabled": LOGIN, "admin": OK}
OWNED_PAGE = {**PAGE, "other": 404}
ADMIN = {"anonymous": LOGIN, "user": 403, "other": 403, "disabled": LOGIN, "admin": OK}
API = {"anonymous": LOGIN, "user": OK, "other": OK, "disabled": LOGIN, "admin": OK}
OWNED_API = {**API, "other": 404}
# A public address given as a literal: nothing is resolved. Endpoints here hear only
# batch.expired, which these tests never cause, and no delivery worker runs in them.
PUBLIC_URL = "https://93.184.215.14/hooks"
# Routing sends these aliases to the dashboard's own address, /admin/rq/, before anything runs.
ALIAS = dict.fromkeys(ROLES, 308)

# (method, rule) -> (the path to call: {pending} {cancelled} {job} {token} {target} are filled in
# with fresh objects, {job} being the pending task's queued job; who gets what).
ROUTES: dict[tuple[str, str], tuple[str, dict]] = {
    ("GET", "/"): ("/", PAGE),
    ("GET", "/login"): ("/login", PUBLIC),
    ("POST", "/login"): ("/login", PUBLIC),
    ("POST", "/logout"): ("/logout", PUBLIC),
    ("GET", "/account"): ("/account", PAGE),
    ("POST", "/account/password"): ("/account/password", PAGE),
    ("POST", "/account/sign-out-everywhere"): ("/account/sign-out-everywhere", PAGE),
    ("POST", "/tasks"): ("/tasks", PAGE),
    ("GET", "/tasks"): ("/tasks", PAGE),
    ("GET", "/tasks/<id:task_id>"): ("/tasks/{pending}", OWNED_PAGE),
    ("GET", "/tasks/<id:task_id>/live"): ("/tasks/{pending}/live", OWNED_PAGE),
    ("GET", "/tasks/<id:task_id>/row"): ("/tasks/{pending}/row", OWNED_PAGE),
    ("POST", "/tasks/<id:task_id>/cancel"): ("/tasks/{pending}/cancel", OWNED_PAGE),
    ("POST", "/tasks/<id:task_id>/retry"): ("/tasks/{cancelled}/retry", OWNED_PAGE),
    ("POST", "/tasks/<id:task_id>/delete"): ("/tasks/{pending}/delete", OWNED_PAGE),
    ("GET", "/tokens"): ("/tokens", PAGE),
    ("GET", "/usage"): ("/usage", PAGE),
    ("POST", "/tokens"): ("/tokens", PAGE),
    # Tokens are per user for admins too: nobody revokes another's token.
    ("POST", "/tokens/<id:token_id>/revoke"): ("/tokens/{token}/revoke", {**OWNED_PAGE, "admin": 404}),
    ("GET", "/static/<path:filename>"): ("/static/app.js", PUBLIC),
    ("GET", "/favicon.ico"): ("/favicon.ico", PUBLIC),
    ("GET", "/metrics"): ("/metrics", ADMIN),
    ("GET", "/admin"): ("/admin", ADMIN),
    ("GET", "/admin/stats"): ("/admin/stats", ADMIN),
    ("GET", "/admin/tasks"): ("/admin/tasks", ADMIN),
    ("POST", "/admin/tasks/preview"): ("/admin/tasks/preview", ADMIN),
    ("POST", "/admin/tasks/apply"): ("/admin/tasks/apply", ADMIN),
    ("GET", "/admin/users"): ("/admin/users", ADMIN),
    ("POST", "/admin/users"): ("/admin/users", ADMIN),
    ("POST", "/admin/users/<id:user_id>/active"): ("/admin/users/{target}/active", ADMIN),
    ("POST", "/admin/users/<id:user_id>/admin"): ("/admin/users/{target}/admin", ADMIN),
    ("POST", "/admin/users/<id:user_id>/password"): ("/admin/users/{target}/password", ADMIN),
    ("POST", "/admin/users/<id:user_id>/budget"): ("/admin/users/{target}/budget", ADMIN),
    ("GET", "/admin/rq/"): ("/admin/rq/", ADMIN),
    ("GET", "/admin/rq/<int:instance_number>/"): ("/admin/rq/0/", ALIAS),
    ("GET", "/admin/rq/<int:instance_number>/view"): ("/admin/rq/0/view", ALIAS),
    ("GET", "/admin/rq/<int:instance_number>/view/queues"): ("/admin/rq/0/view/queues", ALIAS),
    ("GET", "/admin/rq/<int:instance_number>/view/workers"): ("/admin/rq/0/view/workers", ADMIN),
    ("GET", "/admin/rq/<int:instance_number>/view/jobs"): ("/admin/rq/0/view/jobs", ADMIN),
    (
        "GET",
        "/admin/rq/<int:instance_number>/view/jobs/<queue_name>/<registry_name>/<int:per_page>/<order>/<int:page>",
    ): (
        "/admin/rq/0/view/jobs/default/queued/8/asc/1",
        ADMIN,
    ),
    ("GET", "/admin/rq/<int:instance_number>/view/job/<job_id>"): ("/admin/rq/0/view/job/{job}", ADMIN),
    ("GET", "/admin/rq/<int:instance_number>/data/queues.json"): ("/admin/rq/0/data/queues.json", ADMIN),
    ("GET", "/admin/rq/<int:instance_number>/data/workers.json"): ("/admin/rq/0/data/workers.json", ADMIN),
    ("GET", "/admin/rq/<int:instance_number>/data/jobs/<queue_name>/<registry_name>/<per_page>/<order>/<page>.json"): (
        "/admin/rq/0/data/jobs/default/queued/8/asc/1.json",
        ADMIN,
    ),
    ("GET", "/admin/rq/<int:instance_number>/data/job/<job_id>.json"): ("/admin/rq/0/data/job/{job}.json", ADMIN),
    ("GET", "/admin/rq/static/<path:filename>"): ("/admin/rq/static/js/jquery-3.5.1.min.js", ADMIN),
    ("GET", "/admin/rq/favicon.ico"): ("/admin/rq/favicon.ico", ADMIN),
    ("POST", "/admin/rq/job/<job_id>/delete"): ("/admin/rq/job/{job}/delete", ADMIN),
    # Requeueing a job that has not failed is refused by RQ: 409 for the one who may ask.
    ("POST", "/admin/rq/job/<job_id>/requeue"): ("/admin/rq/job/{job}/requeue", {**ADMIN, "admin": 409}),
    ("POST", "/admin/rq/queue/<queue_name>/<registry_name>/empty"): ("/admin/rq/queue/default/queued/empty", ADMIN),
    ("POST", "/admin/rq/queue/<queue_name>/compact"): ("/admin/rq/queue/default/compact", ADMIN),
    ("POST", "/admin/rq/requeue/<queue_name>"): ("/admin/rq/requeue/default", ADMIN),
    # The state-changing GET upstream answers is refused (a link or an <img> could trigger it).
    ("GET", "/admin/rq/requeue/<queue_name>"): ("/admin/rq/requeue/default", {**ADMIN, "admin": 405}),
    ("GET", "/api/v1/openapi.json"): ("/api/v1/openapi.json", PUBLIC),
    ("GET", "/api/v1/docs"): ("/api/v1/docs", PUBLIC),
    ("GET", "/api/v1/docs/ui/<path:filename>"): ("/api/v1/docs/ui/js/swagger-ui-bundle.js", PUBLIC),
    ("GET", "/api/v1/health"): ("/api/v1/health", PUBLIC),
    ("GET", "/api/v1/models"): ("/api/v1/models", API),
    ("GET", "/api/v1/usage"): ("/api/v1/usage", API),
    ("POST", "/api/v1/tasks"): ("/api/v1/tasks", API),
    ("GET", "/api/v1/tasks"): ("/api/v1/tasks", API),
    ("GET", "/api/v1/tasks/<int:task_id>"): ("/api/v1/tasks/{pending}", OWNED_API),
    ("POST", "/api/v1/tasks/<int:task_id>/cancel"): ("/api/v1/tasks/{pending}/cancel", OWNED_API),
    ("POST", "/api/v1/tasks/<int:task_id>/retry"): ("/api/v1/tasks/{cancelled}/retry", OWNED_API),
    ("DELETE", "/api/v1/tasks/<int:task_id>"): ("/api/v1/tasks/{pending}", OWNED_API),
    # A finished task's stream ends at once.
    ("GET", "/api/v1/tasks/<int:task_id>/events"): ("/api/v1/tasks/{cancelled}/events", OWNED_API),
    # Files and batches are per user for admins too: another's answers 404.
    ("POST", "/api/v1/files"): ("/api/v1/files", API),
    ("GET", "/api/v1/files"): ("/api/v1/files", API),
    ("GET", "/api/v1/files/<file_id>"): ("/api/v1/files/{file}", {**OWNED_API, "admin": 404}),
    ("GET", "/api/v1/files/<file_id>/content"): ("/api/v1/files/{file}/content", {**OWNED_API, "admin": 404}),
    ("DELETE", "/api/v1/files/<file_id>"): ("/api/v1/files/{spare_file}", {**OWNED_API, "admin": 404}),
    # The body names alice's fresh file: only she may make a batch of it.
    ("POST", "/api/v1/batches"): ("/api/v1/batches", {**OWNED_API, "admin": 404}),
    ("GET", "/api/v1/batches"): ("/api/v1/batches", API),
    ("GET", "/api/v1/batches/<batch_id>"): ("/api/v1/batches/{batch}", {**OWNED_API, "admin": 404}),
    ("POST", "/api/v1/batches/<batch_id>/cancel"): ("/api/v1/batches/{batch}/cancel", {**OWNED_API, "admin": 404}),
    ("POST", "/api/v1/webhooks"): ("/api/v1/webhooks", API),
    ("GET", "/api/v1/webhooks"): ("/api/v1/webhooks", API),
    # Webhook endpoints are per user for admins too, like tokens.
    ("DELETE", "/api/v1/webhooks/<int:webhook_id>"): ("/api/v1/webhooks/{endpoint}", {**OWNED_API, "admin": 404}),
    ("GET", "/batches"): ("/batches", PAGE),
    ("POST", "/batches"): ("/batches", PAGE),
    ("GET", "/batches/<batch:batch_id>"): ("/batches/{batch}", {**OWNED_PAGE, "admin": 404}),
    ("GET", "/batches/<batch:batch_id>/live"): ("/batches/{batch}/live", {**OWNED_PAGE, "admin": 404}),
    ("POST", "/batches/<batch:batch_id>/cancel"): ("/batches/{batch}/cancel", {**OWNED_PAGE, "admin": 404}),
    ("GET", "/batches/<batch:batch_id>/<any('output.jsonl', 'errors.jsonl', 'output.csv', 'errors.csv'):name>"): (
        "/batches/{batch}/output.jsonl",
        {**OWNED_PAGE, "admin": 404},
    ),
    ("GET", "/webhooks"): ("/webhooks", PAGE),
    ("POST", "/webhooks"): ("/webhooks", PAGE),
    ("GET", "/webhooks/<id:endpoint_id>"): ("/webhooks/{endpoint}", {**OWNED_PAGE, "admin": 404}),
    ("GET", "/webhooks/<id:endpoint_id>/deliveries"): (
        "/webhooks/{endpoint}/deliveries",
        {**OWNED_PAGE, "admin": 404},
    ),
    ("POST", "/webhooks/<id:endpoint_id>/rotate"): ("/webhooks/{endpoint}/rotate", {**OWNED_PAGE, "admin": 404}),
    ("POST", "/webhooks/<id:endpoint_id>/test"): ("/webhooks/{endpoint}/test", {**OWNED_PAGE, "admin": 404}),
    ("POST", "/webhooks/<id:endpoint_id>/enable"): ("/webhooks/{endpoint}/enable", {**OWNED_PAGE, "admin": 404}),
    ("POST", "/webhooks/<id:endpoint_id>/delete"): ("/webhooks/{endpoint}/delete", {**OWNED_PAGE, "admin": 404}),
    ("POST", "/webhooks/deliveries/<id:delivery_id>/resend"): (
        "/webhooks/deliveries/{delivery}/resend",
        {**OWNED_PAGE, "admin": 404},
    ),
}

# What each route is sent besides credentials (a body the route accepts).
FORMS = {
    "/login": {"username": "nobody", "password": "wrong password"},
    "/tasks": {"prompt": "from the matrix"},
    "/tokens": {"name": "matrix"},
    "/admin/tasks/preview": {"action": "retry", "status": "FAILED"},
    "/admin/tasks/apply": {"action": "retry", "status": "FAILED", "up_to_id": "1", "count": "0"},
    "/admin/users": {"username": "newcomer", "password": "long enough password"},
    "/webhooks": {"url": PUBLIC_URL, "events": "batch.expired"},
}
JSON_BODIES = {
    "/api/v1/tasks": {"prompt": "from the matrix"},
    "/api/v1/webhooks": {"url": PUBLIC_URL, "events": ["batch.expired"]},
    "/api/v1/batches": {"input_file_id": "{file}", "endpoint": "/v1/chat/completions", "completion_window": "24h"},
}
BATCH_LINE = b'{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}\n'
# Multipart bodies, made afresh for each request (a file part is read once).
API_FORMS = {"/api/v1/files": lambda: {"file": (io.BytesIO(BATCH_LINE), "matrix.jsonl"), "purpose": "batch"}}
# Routes that end the caller's sign-in (all of them, for the second): the role signs in again after.
ENDS_SIGN_IN = {"/logout", "/account/sign-out-everywhere"}
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


@dataclass
class Caller:
    """A role: its session cookie (and the CSRF token of that session), its API token."""

    app: object
    cookie: str | None = None
    csrf: str | None = None
    token: str | None = None
    user_id: int | None = None

    def client(self):
        """A client carrying the session, fresh for each request (so a sign-out affects one request only)."""
        client = self.app.test_client()
        if self.cookie:
            client.set_cookie("session", self.cookie)
        return client


@dataclass
class World:
    """Five callers and a target user for admin actions; objects are made per request by `fresh`."""

    app: object
    callers: dict[str, Caller] = field(default_factory=dict)
    target_id: int = 0

    def fresh(self) -> dict[str, object]:
        """A PENDING task with a queued job, a CANCELLED task, an API token, a webhook endpoint, two
        uploaded files and a batch of the first, all alice's."""
        owner = self.callers["user"]
        pending = owner_api(self).submit("fresh pending task")
        cancelled = owner_api(self).submit("fresh cancelled task")
        owner_api(self).post(f"/tasks/{cancelled['id']}/cancel")
        with self.app.app_context():
            user = db.session.get(User, owner.user_id)
            row, _ = accounts.create_token(user, "fresh")
            token_id = row.id
            endpoint_id, delivery_id = _webhook(owner.user_id)
            file_id = files.store_upload(user, io.BytesIO(BATCH_LINE), "fresh.jsonl", "batch").id
            spare_file_id = files.store_upload(user, io.BytesIO(BATCH_LINE), "spare.jsonl", "batch").id
            batch_id = batches.create_batch(user, file_id, "/v1/chat/completions", "24h").id
        return {
            "pending": pending["id"],
            "cancelled": cancelled["id"],
            "job": task_row(self.app, pending["id"]).job_id,
            "token": token_id,
            "target": self.target_id,
            "endpoint": endpoint_id,
            "delivery": delivery_id,
            "file": file_id,
            "spare_file": spare_file_id,
            "batch": batch_id,
        }


def _webhook(user_id: int) -> tuple[int, int]:
    """A webhook endpoint of the user's (one, kept under the cap of 10), and a failed delivery to it (for Resend)."""
    endpoint = db.session.scalar(select(WebhookEndpoint).where(WebhookEndpoint.user_id == user_id).limit(1))
    if endpoint is None:
        endpoint = WebhookEndpoint(user_id=user_id, url=PUBLIC_URL, events=["batch.expired"], secret=new_secret())
        db.session.add(endpoint)
        db.session.flush()
    body = outbox.payload("batch.expired", {"id": "batch_matrix"})
    delivery = WebhookDelivery(**outbox._row(endpoint.id, "batch.expired", "batch batch_matrix", body, utcnow()))
    delivery.status = "failed"
    db.session.add(delivery)
    db.session.commit()
    return endpoint.id, delivery.id


def who_may(rule_key) -> str:
    """The role that gets into the view (or anonymous for public routes): only the input can fail it."""
    expected = ROUTES[rule_key][1]
    if expected["anonymous"] == "ok":
        return "anonymous"
    return "user" if expected["user"] == "ok" else "admin"


def owner_api(world: World):
    caller = world.callers["user"]
    return ApiClient(world.app.test_client(), caller.token, None)


NAMES = {"user": "alice", "other": "bob", "disabled": "dave", "admin": "root"}


def sign_in(app, name: str) -> tuple[str, str]:
    """Sign in as `name`; return the session cookie and its CSRF token."""
    client = app.test_client()
    login(client, name)
    csrf = csrf_from(client.get("/tokens").text)  # made now: the session was emptied at sign-in
    return client.get_cookie("session").value, csrf


def build_world(app) -> World:
    world = World(app)
    for role, name in NAMES.items():
        user = make_user(app, name, admin=role == "admin")
        cookie, csrf = sign_in(app, name)
        with app.app_context():
            _, token = accounts.create_token(db.session.get(User, user.id), "matrix")
        world.callers[role] = Caller(app, cookie, csrf, token, user.id)
    anonymous = app.test_client()
    csrf = csrf_from(anonymous.get("/login").text)
    world.callers["anonymous"] = Caller(app, anonymous.get_cookie("session").value, csrf)
    world.target_id = make_user(app, "carol").id
    with app.app_context():
        # Disabled after signing in and after making a token: both must stop working.
        db.session.get(User, world.callers["disabled"].user_id).is_active = False
        db.session.commit()
    return world
