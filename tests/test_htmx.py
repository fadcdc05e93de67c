"""htmx's request and response details (webapp/htmx.py): who asks, from which page, and what a
page answering both htmx and a plain browser must say."""

from __future__ import annotations

import pytest

from tests.helpers import login, make_user
from webapp import htmx

HTMX = {"HX-Request": "true"}


def test_only_htmx_s_own_header_value_makes_an_htmx_request(app):
    for headers, expected in [(HTMX, True), ({"HX-Request": "false"}, False), ({}, False)]:
        with app.test_request_context("/", headers=headers):
            assert htmx.is_htmx() is expected


def test_the_current_url_is_the_page_htmx_sent_the_request_from(app):
    with app.test_request_context("/tasks/5/live", headers={"HX-Current-URL": "http://localhost/tasks?q=a%20b"}):
        assert (htmx.current_url().path, htmx.current_url().query) == ("/tasks", "q=a%20b")
    with app.test_request_context("/tasks/5/live"):
        assert htmx.current_url().path == ""


@pytest.mark.parametrize("headers", [HTMX, {}])
def test_every_page_varies_on_hx_request(client, app, headers):
    """A page answers htmx with a partial and a browser with the page: no cache may mix them up."""
    make_user(app)
    login(client)
    for path in ("/", "/tasks"):
        response = client.get(path, headers=headers)
        assert response.status_code == 200
        assert "HX-Request" in response.headers["Vary"]


def test_a_signed_out_poll_comes_back_to_its_page_with_the_query(client, app):
    response = client.get("/tasks", headers={**HTMX, "HX-Current-URL": "http://localhost/tasks?status=FAILED"})
    assert response.status_code == 401 and response.get_data() == b""
    assert response.headers["HX-Redirect"] == "/login?next=/tasks?status%3DFAILED"


def test_a_signed_out_poll_that_names_no_page_comes_back_home(client, app):
    response = client.get("/tasks/7/live", headers=HTMX)
    assert response.status_code == 401
    assert response.headers["HX-Redirect"] == "/login?next=/"


def test_a_plain_request_is_redirected_not_told_by_header(client, app):
    response = client.get("/tasks/7/live", headers={"HX-Request": "false"})
    assert response.status_code == 302 and "HX-Redirect" not in response.headers
