"""Who may do what: every route and method of the app × every kind of caller, generated from the URL map.

Roles: anonymous; `user` (alice, who owns the objects); `other` (bob, another user); `disabled`
(dave, whose session and token were made while he was active, then an admin disabled him);
`admin` (root). Pages, the admin area, rq-dashboard and /metrics are called with the role's
session cookie (and a valid CSRF token, so what is tested is the authorization); the API with
the role's bearer token. Each request gets fresh objects, so one role's delete cannot hide
another role's answer.

A route added to the app without an entry in ROUTES fails `test_every_route_has_an_entry`.
The same table drives the CSRF tests (every state-changing browser route refuses a request
without a valid token) and the check that the API takes no cookie as a credential.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from rq import Queue
from rq.serializers import JSONSerializer
from sqlalchemy import text

from tests.conftest import api_client, make_user, redis_conn, task_row, work
from tests.tally import counts
from tests.test_pages import csrf_from, login
from webapp.extensions import db
from webapp.models import User
from webapp.services import accounts

ROLES = ("anonymous", "user", "other", "disabled", "admin")
OK, LOGIN = "ok", "login"  # ok: 2xx/3xx that is not a trip to the sign-in page; login: sent to sign in (or 401)

PUBLIC = dict.fromkeys(ROLES, OK)
PAGE = {"anonymous": LOGIN, "user": OK, "other": OK, "disabled": LOGIN, "admin": OK}
OWNED_PAGE = {**PAGE, "other": 404}
ADMIN = {"anonymous": LOGIN, "user": 403, "other": 403, "disabled": LOGIN, "admin": OK}
API = {"anonymous": LOGIN, "user": OK, "other": OK, "disabled": LOGIN, "admin": OK}
OWNED_API = {**API, "other": 404}
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
    ("GET", "/tasks/<int:task_id>"): ("/tasks/{pending}", OWNED_PAGE),
    ("GET", "/tasks/<int:task_id>/live"): ("/tasks/{pending}/live", OWNED_PAGE),
    ("GET", "/tasks/<int:task_id>/row"): ("/tasks/{pending}/row", OWNED_PAGE),
    ("POST", "/tasks/<int:task_id>/cancel"): ("/tasks/{pending}/cancel", OWNED_PAGE),
    ("POST", "/tasks/<int:task_id>/retry"): ("/tasks/{cancelled}/retry", OWNED_PAGE),
    ("POST", "/tasks/<int:task_id>/delete"): ("/tasks/{pending}/delete", OWNED_PAGE),
    ("GET", "/tokens"): ("/tokens", PAGE),
    ("POST", "/tokens"): ("/tokens", PAGE),
    # Tokens are per user for admins too: nobody revokes another's token.
    ("POST", "/tokens/<int:token_id>/revoke"): ("/tokens/{token}/revoke", {**OWNED_PAGE, "admin": 404}),
    ("GET", "/static/<path:filename>"): ("/static/app.js", PUBLIC),
    ("GET", "/metrics"): ("/metrics", ADMIN),
    ("GET", "/admin"): ("/admin", ADMIN),
    ("GET", "/admin/stats"): ("/admin/stats", ADMIN),
    ("GET", "/admin/tasks"): ("/admin/tasks", ADMIN),
    ("POST", "/admin/tasks/preview"): ("/admin/tasks/preview", ADMIN),
    ("POST", "/admin/tasks/apply"): ("/admin/tasks/apply", ADMIN),
    ("GET", "/admin/users"): ("/admin/users", ADMIN),
    ("POST", "/admin/users"): ("/admin/users", ADMIN),
    ("POST", "/admin/users/<int:user_id>/active"): ("/admin/users/{target}/active", ADMIN),
    ("POST", "/admin/users/<int:user_id>/admin"): ("/admin/users/{target}/admin", ADMIN),
    ("POST", "/admin/users/<int:user_id>/password"): ("/admin/users/{target}/password", ADMIN),
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
    ("GET", "/api/v1/health"): ("/api/v1/health", PUBLIC),
    ("GET", "/api/v1/models"): ("/api/v1/models", API),
    ("POST", "/api/v1/tasks"): ("/api/v1/tasks", API),
    ("GET", "/api/v1/tasks"): ("/api/v1/tasks", API),
    ("GET", "/api/v1/tasks/<int:task_id>"): ("/api/v1/tasks/{pending}", OWNED_API),
    ("POST", "/api/v1/tasks/<int:task_id>/cancel"): ("/api/v1/tasks/{pending}/cancel", OWNED_API),
    ("POST", "/api/v1/tasks/<int:task_id>/retry"): ("/api/v1/tasks/{cancelled}/retry", OWNED_API),
    ("DELETE", "/api/v1/tasks/<int:task_id>"): ("/api/v1/tasks/{pending}", OWNED_API),
}

# What each route is sent besides credentials (a body the route accepts).
FORMS = {
    "/login": {"username": "nobody", "password": "wrong password"},
    "/tasks": {"prompt": "from the matrix"},
    "/tokens": {"name": "matrix"},
    "/admin/tasks/preview": {"action": "retry", "status": "FAILED"},
    "/admin/tasks/apply": {"action": "retry", "status": "FAILED", "up_to_id": "1", "count": "0"},
    "/admin/users": {"username": "newcomer", "password": "long enough password"},
}
JSON_BODIES = {"/api/v1/tasks": {"prompt": "from the matrix"}}
# Routes that end the caller's sign-in (all of them, for the second): the role signs in again after.
ENDS_SIGN_IN = {"/logout", "/account/sign-out-everywhere"}
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


def app_routes(app) -> set[tuple[str, str]]:
    return {(method, rule.rule) for rule in app.url_map.iter_rules() for method in rule.methods - {"HEAD", "OPTIONS"}}


def test_every_route_has_an_entry(app):
    """A new route (or method) must say here who may call it."""
    routes = app_routes(app)
    assert routes - set(ROUTES) == set(), "routes without an entry in ROUTES: add who may call them"
    assert set(ROUTES) - routes == set(), "entries in ROUTES for routes that no longer exist"


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
        """A PENDING task with a queued job, a CANCELLED task and an API token, all alice's."""
        owner = self.callers["user"]
        pending = owner_api(self).submit("fresh pending task")
        cancelled = owner_api(self).submit("fresh cancelled task")
        owner_api(self).post(f"/tasks/{cancelled['id']}/cancel")
        with self.app.app_context():
            row, _ = accounts.create_token(db.session.get(User, owner.user_id), "fresh")
            token_id = row.id
        return {
            "pending": pending["id"],
            "cancelled": cancelled["id"],
            "job": task_row(self.app, pending["id"]).job_id,
            "token": token_id,
            "target": self.target_id,
        }


def owner_api(world: World):
    caller = world.callers["user"]
    from tests.conftest import ApiClient

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


def call(world: World, role: str, method: str, rule: str, *, session: bool | None = None, csrf: bool = True, **kw):
    """Call a route as `role`: pages with the session (and CSRF token), the API with the bearer token."""
    path_template, _ = ROUTES[(method, rule)]
    path = path_template.format(**world.fresh()) if "{" in path_template else path_template
    caller = world.callers[role]
    api = path.startswith("/api/")
    use_session = (not api) if session is None else session
    client = caller.client() if use_session else world.app.test_client()
    headers = dict(kw.pop("headers", {}))
    if api and caller.token and not session:
        headers["Authorization"] = f"Bearer {caller.token}"
    options: dict = {"headers": headers, **kw}
    if api and path in JSON_BODIES and method == "POST":
        options.setdefault("json", JSON_BODIES[path])
    elif method in STATE_CHANGING and not api:
        data = dict(FORMS.get(path, {}))
        if csrf:
            data["csrf_token"] = caller.csrf
            headers["X-CSRFToken"] = caller.csrf  # rq-dashboard's POSTs send it as a header
        options.setdefault("data", data)
    response = getattr(client, method.lower())(path, **options)
    if path in ENDS_SIGN_IN and role in NAMES and role != "disabled" and outcome(response) == OK:
        caller.cookie, caller.csrf = sign_in(world.app, NAMES[role])
    return response, path


def outcome(response) -> str | int:
    status = response.status_code
    if status == 401 or (status in (302, 303) and response.headers["Location"].startswith("/login?next=")):
        return LOGIN
    if status == 308:
        assert response.headers["Location"].endswith("://localhost/admin/rq/"), response.headers["Location"]
        return 308
    if status < 400:
        return OK
    return status


def check_headers(response, path: str) -> list[str]:
    """The browser protections every response carries."""
    problems = []
    headers = response.headers
    if headers.get("X-Content-Type-Options") != "nosniff":
        problems.append("no X-Content-Type-Options: nosniff")
    if headers.get("Referrer-Policy") != "same-origin":
        problems.append("no Referrer-Policy")
    csp = headers.get("Content-Security-Policy", "")
    if "frame-ancestors 'none'" not in csp:
        problems.append(f"CSP without frame-ancestors 'none': {csp!r}")
    if response.mimetype == "text/html":
        if "script-src 'self'" not in csp or "'unsafe-inline'" in csp.split("script-src")[1].split(";")[0]:
            problems.append(f"HTML without script-src 'self' (or with inline script allowed): {csp!r}")
        if not path.startswith("/admin/rq/") and "unsafe" in csp:
            problems.append(f"an unsafe source outside rq-dashboard: {csp!r}")
    return problems


@pytest.fixture
def world(app):
    return build_world(app)  # what it queues is flushed with the test's Redis db


def test_authorization_matrix(world):
    """Each role gets exactly what ROUTES says, on every route; every answer carries the security headers."""
    mismatches = []
    for (method, rule), (_, expected) in sorted(ROUTES.items(), key=lambda item: item[0][::-1]):
        for role in ROLES:
            response, path = call(world, role, method, rule)
            counts["routes x roles checked"] += 1
            got = outcome(response)
            if got != expected[role]:
                mismatches.append(
                    f"{method} {path} as {role}: expected {expected[role]}, got {got} ({response.status})"
                )
            if response.status_code >= 500:
                mismatches.append(f"{method} {path} as {role}: {response.status}")
            mismatches += [f"{method} {path} as {role}: {problem}" for problem in check_headers(response, path)]
    assert not mismatches, "\n".join(mismatches)


def test_credentials_do_not_cross(world):
    """The API takes no session cookie as a credential, and pages take no API token."""
    admin_token = {"Authorization": f"Bearer {world.callers['admin'].token}"}
    for (method, rule), (_, expected) in ROUTES.items():
        if rule.startswith("/api/") and expected is not PUBLIC:
            for role in ("user", "admin"):
                response, path = call(world, role, method, rule, session=True)
                counts["routes x roles checked"] += 1
                assert response.status_code == 401, f"{method} {path} took {role}'s session cookie"
        elif not rule.startswith("/api/") and method == "GET":
            response, path = call(world, "admin", method, rule, session=False, headers=admin_token)
            counts["routes x roles checked"] += 1
            assert outcome(response) == expected["anonymous"], f"GET {path} took a bearer token"


def state(app) -> tuple:
    """Everything a forged request could change: the rows and the jobs."""
    with app.app_context():
        rows = db.session.execute(
            text(
                "SELECT (SELECT json_agg(t ORDER BY id) FROM (SELECT id, status, user_id, attempts FROM tasks) t),"
                " (SELECT json_agg(u ORDER BY id) FROM (SELECT id, is_active, is_admin, password_hash FROM users) u),"
                " (SELECT json_agg(k ORDER BY id) FROM (SELECT id, revoked_at FROM api_tokens) k),"
                " (SELECT json_agg(s ORDER BY id) FROM (SELECT id, user_id FROM user_sessions) s)"
            )
        ).one()
        db.session.remove()
    connection = redis_conn()
    jobs = sorted(
        (name, tuple(Queue(name, connection=connection, serializer=JSONSerializer).job_ids))
        for name in ("high", "default", "low")
    )
    return tuple(rows), tuple(jobs)


def browser_state_changing_routes():
    return sorted(key for key in ROUTES if key[0] in STATE_CHANGING and not key[1].startswith("/api/"))


FORGERIES = ("no token", "a wrong token", "htmx without the header", "another session's token")


def test_every_state_changing_browser_route_needs_the_csrf_token(world):
    """Forged POSTs are refused (400) on every browser route, htmx ones included, and change nothing."""
    app = world.app
    other_token = world.callers["other"].csrf
    for forgery, (method, rule) in itertools.product(FORGERIES, browser_state_changing_routes()):
        path_template, expected = ROUTES[(method, rule)]
        # Whoever may call the route, so only the token can stop the request.
        role = "admin" if expected["admin"] == OK else "user"
        caller = world.callers[role]
        values = world.fresh()
        path = path_template.format(**values)
        data = dict(FORMS.get(path, {}))
        headers = {}
        if forgery == "a wrong token":
            data["csrf_token"] = caller.csrf[:-4] + "AAAA"
            headers["X-CSRFToken"] = caller.csrf[:-4] + "AAAA"
        elif forgery == "htmx without the header":
            headers["HX-Request"] = "true"
        elif forgery == "another session's token":
            data["csrf_token"] = other_token
            headers["X-CSRFToken"] = other_token
        before = state(app)
        response = getattr(caller.client(), method.lower())(path, data=data, headers=headers)
        counts["forged requests refused"] += 1
        assert response.status_code == 400, f"{method} {path} ({forgery}): {response.status}"
        assert "CSRF" in response.get_data(as_text=True)
        assert state(app) == before, f"{method} {path} ({forgery}) changed something"


def test_a_forged_sign_in_does_not_sign_in(app, client):
    """Login CSRF: a cross-site form that signs the victim into the attacker's account is refused."""
    make_user(app, "mallory")
    response = client.post("/login", data={"username": "mallory", "password": "correct horse battery"})
    assert response.status_code == 400
    assert client.get("/").status_code == 302


def test_an_api_token_is_enough_for_the_api_and_no_csrf_is_asked(app):
    api = api_client(app, "erin")
    # A bearer call carries no cookie and no CSRF token: exempt, as nothing forgeable authenticates it.
    assert api.post("/tasks", json={"prompt": "no csrf needed"}).status_code == 202
    work(app)
