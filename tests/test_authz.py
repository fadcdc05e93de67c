"""Who may do what: every route and method of the app × every kind of caller, generated from the URL map.

Roles: anonymous; `user` (alice, who owns the objects); `other` (bob, another user); `disabled`
(dave, whose session and token were made while he was active, then an admin disabled him);
`admin` (root). Pages, the admin area, rq-dashboard and /metrics are called with the role's
session cookie (and a valid CSRF token, so what is tested is the authorization); the API with
the role's bearer token. Each request gets fresh objects, so one role's delete cannot hide
another role's answer.

A route added to the app without an entry in ROUTES (tests/routes.py) fails
`test_every_route_has_an_entry`.
The same table drives the CSRF tests (every state-changing browser route refuses a request
without a valid token) and the check that the API takes no cookie as a credential.
"""

from __future__ import annotations

import itertools
import json

import pytest
from rq import Queue
from rq.serializers import JSONSerializer
from sqlalchemy import text

from tests.helpers import api_client, make_user, redis_conn, work
from tests.routes import (
    API_FORMS,
    ENDS_SIGN_IN,
    FORMS,
    JSON_BODIES,
    LOGIN,
    NAMES,
    OK,
    PUBLIC,
    ROLES,
    ROUTES,
    STATE_CHANGING,
    World,
    build_world,
    sign_in,
)
from tests.tally import counts
from webapp.extensions import db


def app_routes(app) -> set[tuple[str, str]]:
    return {(method, rule.rule) for rule in app.url_map.iter_rules() for method in rule.methods - {"HEAD", "OPTIONS"}}


def test_every_route_has_an_entry(app):
    """A new route (or method) must say here who may call it."""
    routes = app_routes(app)
    assert routes - set(ROUTES) == set(), "routes without an entry in ROUTES: add who may call them"
    assert set(ROUTES) - routes == set(), "entries in ROUTES for routes that no longer exist"


def call(world: World, role: str, method: str, rule: str, *, session: bool | None = None, csrf: bool = True, **kw):
    """Call a route as `role`: pages with the session (and CSRF token), the API with the bearer token."""
    path_template, _ = ROUTES[(method, rule)]
    body = JSON_BODIES.get(path_template) if method == "POST" else None
    fresh = world.fresh() if "{" in path_template or "{" in json.dumps(body or "") else {}
    path = path_template.format(**fresh)
    caller = world.callers[role]
    api = path.startswith("/api/")
    use_session = (not api) if session is None else session
    client = caller.client() if use_session else world.app.test_client()
    headers = dict(kw.pop("headers", {}))
    if api and caller.token and not session:
        headers["Authorization"] = f"Bearer {caller.token}"
    options: dict = {"headers": headers, **kw}
    if api and body is not None:
        filled = {name: value.format(**fresh) if isinstance(value, str) else value for name, value in body.items()}
        options.setdefault("json", filled)
    elif api and path in API_FORMS and method == "POST":
        options.setdefault("data", API_FORMS[path]())
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
