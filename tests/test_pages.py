"""Pages without a browser: sign-in, CSRF, the submit form and the live task partial."""

from __future__ import annotations

import re

from tests.conftest import PASSWORD, make_user, work


def csrf_from(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


def login(client, username: str = "alice", password: str = PASSWORD):
    token = csrf_from(client.get("/login").get_data(as_text=True))
    return client.post("/login", data={"username": username, "password": password, "csrf_token": token})


def submit_form(client, **fields):
    token = csrf_from(client.get("/").get_data(as_text=True))
    return client.post("/tasks", data={"csrf_token": token, **fields})


def test_pages_need_a_session(client, app):
    response = client.get("/")
    assert response.status_code == 302 and response.headers["Location"].startswith("/login?next=/")


def test_wrong_password_says_so_and_keeps_the_username(client, app):
    make_user(app)
    response = login(client, password="nope")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert "Wrong username or password." in html and 'value="alice"' in html


def test_disabled_users_cannot_sign_in(client, app):
    from webapp.extensions import db
    from webapp.models import User

    make_user(app)
    with app.app_context():
        db.session.query(User).update({"is_active": False})
        db.session.commit()
    assert "Wrong username or password." in login(client).get_data(as_text=True)


def test_sign_in_then_out(client, app):
    make_user(app)
    response = login(client)
    assert response.status_code == 302 and response.headers["Location"] == "/"
    assert "New task" in client.get("/").get_data(as_text=True)
    # Signing out is a POST with a CSRF token.
    assert client.post("/logout").status_code == 400
    token = csrf_from(client.get("/").get_data(as_text=True))
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    assert client.get("/").status_code == 302


def test_next_goes_only_to_this_site(client, app):
    make_user(app)
    token = csrf_from(client.get("/login").get_data(as_text=True))
    data = {"username": "alice", "password": PASSWORD, "csrf_token": token}
    response = client.post("/login?next=//evil.example/x", data=data)
    assert response.headers["Location"] == "/"


def test_forms_refuse_a_missing_csrf_token(client, app):
    make_user(app)
    login(client)
    response = client.post("/tasks", data={"prompt": "no token"})
    assert response.status_code == 400
    assert "CSRF" in response.get_data(as_text=True)


def test_submit_lands_on_the_task_page_which_polls_until_done(client, app):
    make_user(app)
    login(client)
    response = submit_form(client, prompt="hello page", model="fake", priority="7")
    assert response.status_code == 303
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    task_id = int(response.headers["Location"].rsplit("/", 1)[1])
    assert "hello page" in page and "PENDING" in page
    assert f'hx-get="/tasks/{task_id}/live"' in page
    work(app)
    live = client.get(f"/tasks/{task_id}/live").get_data(as_text=True)
    assert "COMPLETED" in live and "Echo: hello page" in live
    assert "hx-get" not in live  # finished: polling stops by itself


def test_a_validation_error_keeps_what_was_typed(client, app):
    make_user(app)
    login(client)
    typed = "my carefully typed prompt <b>"
    response = submit_form(client, prompt=typed, model="fake", priority="11")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert "my carefully typed prompt &lt;b&gt;" in html
    assert "Priority must be between 1" in html and 'aria-invalid="true"' in html


def test_another_users_task_page_is_404(client, app, api):
    task = api.submit("alice's secret")
    make_user(app, "mallory")
    login(client, "mallory")
    assert client.get(f"/tasks/{task['id']}").status_code == 404
    assert client.get(f"/tasks/{task['id']}/live").status_code == 404


def test_untrusted_text_is_escaped(client, app, api):
    task = api.submit('<script>alert(1)</script><img src=x onerror=alert(2)> <a hx-get="/x">x</a>')
    login(client)
    html = client.get(f"/tasks/{task['id']}").get_data(as_text=True)
    assert "<script>alert(1)" not in html and "<img src=x" not in html and '<a hx-get="/x"' not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_the_api_ignores_session_cookies(client, app):
    make_user(app)
    login(client)
    assert client.get("/api/v1/tasks").status_code == 401
