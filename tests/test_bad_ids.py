"""Ids and cursors out of every range: a 404 or a 422 with a message, never a 500.

Every route of tests/routes.py with an id in its path is called with ids past 2^63-1, zero,
negative and not numbers, by a caller the route lets in; History's `before`/`after` and the
API's `cursor` are sent forged cursors. On PostgreSQL a huge id merely finds no row; SQLite's
driver cannot bind one at all (OverflowError), so tests/test_embedded_input.py runs this module
again on the embedded SQLite + Valkey path.
"""

from __future__ import annotations

import base64

import pytest

from tests.helpers import error_of
from tests.routes import ROUTES, STATE_CHANGING, build_world, who_may
from webapp.models import MAX_ID

BAD_IDS = [str(MAX_ID + 1), str(2**64), "9" * 30, "-1", "0", "-0", "abc", "1.5", "1e3", "0x10", "٣", "%20"]
# Routes whose path carries one of our row ids (rq-dashboard's numbers are its own, and routed there).
ID_ROUTES = sorted(key for key in ROUTES if "_id>" in key[1] and not key[1].startswith("/admin/rq"))


def forged(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


FORGED_CURSORS = [
    forged(f"id:{MAX_ID + 1}"),
    forged("id:" + "9" * 40),
    forged("id:0"),
    forged("id:-5"),
    forged("id:٣"),  # a digit, but not an ASCII one
    forged("id:"),
    forged("task:5"),
    base64.urlsafe_b64encode(b"\xff\xfe").decode().rstrip("="),  # not UTF-8 inside
    "!!!",
    "a",
    "A" * 5000,
]


@pytest.fixture
def id_world(app):
    """The callers of tests/routes.py (alice, bob, dave disabled, root the admin, anonymous)."""
    return build_world(app)


def call(world, rule_key: tuple[str, str], path: str, follow: bool = False):
    method, rule = rule_key
    if rule.startswith("/api/"):
        headers = {"Authorization": f"Bearer {world.callers['user'].token}"}
        return world.app.test_client().open(path, method=method, headers=headers)
    caller = world.callers[who_may(rule_key)]
    client = caller.client()
    if method in STATE_CHANGING:
        return client.open(path, method=method, data={"csrf_token": caller.csrf}, follow_redirects=follow)
    return client.get(path)


def test_every_id_route_is_known():
    """Every route with an id is checked: pages take <id:…> (or <batch:…>), the API a bounded path model."""
    assert len(ID_ROUTES) >= 24
    assert all("<id:" in rule or "<batch:" in rule for _, rule in ID_ROUTES if not rule.startswith("/api/"))


def test_ids_out_of_range_are_404_or_422(id_world):
    answers = {}
    for rule_key, bad in ((key, bad) for key in ID_ROUTES for bad in BAD_IDS):
        path = rule_key[1]
        start, end = path.index("<"), path.index(">")
        path = path[:start] + bad + path[end + 1 :]
        response = call(id_world, rule_key, path)
        answers[(rule_key[0], path)] = response.status_code
        if path.startswith("/api/"):
            assert response.status_code in (404, 422), (path, response.status)
            assert error_of(response)["message"]
        else:
            assert response.status_code == 404, (rule_key[0], path, response.status)
            assert "There is nothing at this address." in response.text, path
    assert len(answers) == len(ID_ROUTES) * len(BAD_IDS)


def test_the_largest_id_finds_nothing_in_the_ordinary_way(id_world):
    """2^63-1 itself is in range: it reaches the query and finds nothing (a 404, or for the admin's
    user actions the Users page again with "User … does not exist")."""
    for rule_key in ID_ROUTES:
        path = rule_key[1]
        start, end = path.index("<"), path.index(">")
        response = call(id_world, rule_key, path[:start] + str(MAX_ID) + path[end + 1 :], follow=True)
        if rule_key[1].startswith(("/admin/users/<id:user_id>/active", "/admin/users/<id:user_id>/admin")):
            assert response.status_code == 200 and f"User {MAX_ID} does not exist." in response.text
        else:
            assert response.status_code == 404, (rule_key, response.status)


@pytest.mark.parametrize("name", ["before", "after"])
def test_history_refuses_a_forged_cursor_with_a_message(id_world, name):
    client = id_world.callers["user"].client()
    for cursor in FORGED_CURSORS:
        response = client.get("/tasks", query_string={name: cursor})
        assert response.status_code == 422, (cursor, response.status)
        assert "The cursor is not valid" in response.text


def test_the_api_refuses_a_forged_cursor_with_422(id_world):
    headers = {"Authorization": f"Bearer {id_world.callers['user'].token}"}
    client = id_world.app.test_client()
    for cursor in FORGED_CURSORS:
        response = client.get("/api/v1/tasks", query_string={"cursor": cursor}, headers=headers)
        assert response.status_code == 422, (cursor, response.status)
        assert "cursor" in error_of(response)["details"]


def test_a_real_cursor_still_pages(id_world):
    """The bounds refuse only what the app never hands out."""
    world = id_world
    api = world.app.test_client()
    headers = {"Authorization": f"Bearer {world.callers['user'].token}"}
    for prompt in ("one", "two", "three"):
        assert api.post("/api/v1/tasks", json={"prompt": prompt}, headers=headers).status_code == 202
    first = api.get("/api/v1/tasks?limit=2", headers=headers).get_json()
    rest = api.get(f"/api/v1/tasks?limit=2&cursor={first['next_cursor']}", headers=headers).get_json()
    assert [t["prompt"] for t in first["items"] + rest["items"]] == ["three", "two", "one"]
    page = world.callers["user"].client().get("/tasks", query_string={"before": first["next_cursor"]})
    assert page.status_code == 200 and "one" in page.text
