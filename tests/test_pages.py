"""Pages without a browser: sign-in and its throttling, CSRF, the forms, the partials, History, tokens."""

from __future__ import annotations

import re

import pytest

from tests.helpers import PASSWORD, csrf_from, login, make_user, task_row, work
from webapp.errors import ForbiddenError
from webapp.rendering import render_markdown


def submit_form(client, **fields):
    token = csrf_from(client.get("/").get_data(as_text=True))
    return client.post("/tasks", data={"csrf_token": token, **fields})


def post_form(client, path: str, page: str = "/", headers: dict | None = None):
    token = csrf_from(client.get(page).get_data(as_text=True))
    return client.post(path, data={"csrf_token": token}, headers=headers or {})


HTMX = {"HX-Request": "true"}


# -- signing in --------------------------------------------------------------------------------


def test_pages_need_a_session(client, app):
    response = client.get("/")
    assert response.status_code == 302 and response.headers["Location"].startswith("/login?next=/")


def test_an_htmx_poll_without_a_session_sends_the_tab_to_sign_in(client, app):
    response = client.get("/tasks/7/live", headers={**HTMX, "HX-Current-URL": "http://localhost/tasks/7"})
    assert response.status_code == 401
    assert response.headers["HX-Redirect"] == "/login?next=/tasks/7"
    assert response.get_data() == b""  # nothing to swap into the task


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
    response = client.post("/logout", data={"csrf_token": token}, follow_redirects=True)
    assert "You are signed out." in response.get_data(as_text=True)
    assert client.get("/").status_code == 302


def test_next_goes_only_to_this_site(client, app):
    make_user(app)
    token = csrf_from(client.get("/login").get_data(as_text=True))
    data = {"username": "alice", "password": PASSWORD, "csrf_token": token}
    for target in ("//evil.example/x", "/\\evil.example", "/%09/evil.example", "https://evil.example/"):
        response = client.post(f"/login?next={target}", data=data)
        assert response.headers["Location"] == "/", target
        post_form(client, "/logout")
        data["csrf_token"] = csrf_from(client.get("/login").get_data(as_text=True))
    response = client.post("/login?next=/tasks%3Fstatus%3DFAILED", data=data)
    assert response.headers["Location"] == "/tasks?status=FAILED"


@pytest.fixture
def limited_client(app, client, monkeypatch):
    """A client of the app with the rate limits on, for this test only (the suite runs with them off)."""
    monkeypatch.setitem(app.config, "RATELIMIT_ENABLED", True)
    monkeypatch.setitem(app.config, "LOGIN_LIMIT_PER_ACCOUNT", "3/minute")
    monkeypatch.setitem(app.config, "LOGIN_LIMIT_PER_ADDRESS", "5/minute")
    return client


def test_repeated_failures_on_an_account_are_throttled(limited_client, app):
    make_user(app)
    make_user(app, "bob")
    client = limited_client
    for _ in range(3):
        assert login(client, password="wrong guess").status_code == 200
    # Over the limit: refused even with the right password, with a plain message and Retry-After.
    response = login(client)
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) > 0
    html = response.get_data(as_text=True)
    assert "Too many failed sign-ins. Wait" in html and 'value="alice"' in html
    # The name is throttled case-insensitively; another account from here is not.
    assert login(client, "ALICE").status_code == 429
    assert login(client, "bob").status_code == 302


def test_successful_sign_ins_do_not_count(limited_client, app):
    make_user(app)
    client = limited_client
    for _ in range(4):
        assert login(client).status_code == 302
        post_form(client, "/logout")
    assert login(client, password="one wrong guess").status_code == 200


def test_repeated_failures_from_one_address_are_throttled(limited_client, app):
    make_user(app)
    client = limited_client
    for n in range(5):
        assert login(client, f"nobody{n}", "wrong guess").status_code == 200
    assert login(client).status_code == 429


def test_forms_refuse_a_missing_csrf_token(client, app):
    make_user(app)
    login(client)
    response = client.post("/tasks", data={"prompt": "no token"})
    assert response.status_code == 400
    assert "CSRF" in response.get_data(as_text=True)
    # htmx requests too: without the X-CSRFToken header a cancel is refused.
    assert client.post("/tasks/1/cancel", headers=HTMX).status_code == 400


def test_pages_send_browser_protections(client, app):
    make_user(app)
    login(client)
    for path in ("/", "/tasks", "/tokens", "/tasks/999"):
        response = client.get(path)
        csp = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe" not in csp and "frame-ancestors 'none'" in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store"


def test_htmx_is_told_to_evaluate_no_script(client, app):
    html = client.get("/login").get_data(as_text=True)
    config = re.search(r"<meta name=\"htmx-config\" content='([^']+)'>", html).group(1)
    assert '"allowEval": false' in config and '"allowScriptTags": false' in config
    assert '"selfRequestsOnly": true' in config
    assert "<script>" not in html and "onclick" not in html  # no inline script anywhere


# -- submitting --------------------------------------------------------------------------------


def test_the_form_preselects_the_default_model_and_shows_the_limit(client, app):
    make_user(app)
    login(client)
    html = client.get("/").get_data(as_text=True)
    assert re.search(r'<option value="fake"[^>]*selected', html)
    assert "Up to 32,000 characters." in html
    assert 'name="max_tokens"' in html and 'name="temperature"' in html and 'name="system"' in html


def test_submit_lands_on_the_task_page_which_polls_until_done(client, app):
    make_user(app)
    login(client)
    response = submit_form(client, prompt="hello page", model="fake", priority="7")
    assert response.status_code == 303
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    task_id = int(response.headers["Location"].rsplit("/", 1)[1])
    assert "hello page" in page and "Pending" in page
    assert f'hx-get="/tasks/{task_id}/live?seen=PENDING"' in page
    assert '<meta http-equiv="refresh"' in page  # inside <noscript>: no-JS readers refresh
    work(app)
    live = client.get(f"/tasks/{task_id}/live?seen=PENDING").get_data(as_text=True)
    assert "Completed" in live and "Echo: hello page" in live
    assert "hx-get" not in live  # finished: polling stops by itself
    # The status changed since the page's copy: the screen-reader announcement is updated once.
    assert 'id="task-announcer" hx-swap-oob="innerHTML"' in live
    again = client.get(f"/tasks/{task_id}/live?seen=COMPLETED").get_data(as_text=True)
    assert "hx-swap-oob" not in again


def test_advanced_fields_reach_the_task(client, app):
    make_user(app)
    login(client)
    response = submit_form(
        client, prompt="p", model="fake", priority="3", max_tokens="12", temperature="0.4", system="Be brief."
    )
    task = task_row(app, int(response.headers["Location"].rsplit("/", 1)[1]))
    assert (task.priority, task.params) == (3, {"max_tokens": 12, "temperature": 0.4, "system": "Be brief."})


def test_a_validation_error_keeps_what_was_typed(client, app):
    make_user(app)
    login(client)
    typed = "my carefully typed prompt <b>"
    response = submit_form(client, prompt=typed, model="fake", priority="11", temperature="warm")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert "my carefully typed prompt &lt;b&gt;" in html
    assert "Priority must be between 1" in html and 'aria-invalid="true"' in html
    assert 'id="temperature-error">Enter a number, like 0.7.' in html
    assert 'value="warm"' in html and '<details class="advanced" open>' in html


@pytest.mark.parametrize(
    "fields, field, message",
    [
        ({"prompt": ""}, "prompt", "Enter a prompt."),
        ({"prompt": "x" * 32_001}, "prompt", "The prompt has 32,001 characters; the limit is 32,000."),
        ({"prompt": "nul \x00"}, "prompt", "must not contain NUL characters"),
        ({"prompt": "p", "model": "nope"}, "model", "Unknown model"),
        ({"prompt": "p", "max_tokens": "0"}, "max_tokens", "max_tokens must be at least 1."),
        ({"prompt": "p", "max_tokens": "1.5"}, "max_tokens", "Enter a whole number."),
        ({"prompt": "p", "temperature": "nan"}, "temperature", "Enter a number"),
        ({"prompt": "p", "temperature": "3"}, "temperature", "temperature must be between 0 and 2."),
    ],
)
def test_each_mistake_is_shown_beside_its_field(client, app, fields, field, message):
    make_user(app)
    login(client)
    response = submit_form(client, **fields)
    assert response.status_code == 200
    match = re.search(rf'<p class="field-error" id="{field}-error">([^<]*)</p>', response.get_data(as_text=True))
    assert match and message in match.group(1)


# -- one task ----------------------------------------------------------------------------------


def test_another_users_task_page_is_404(client, app, api):
    task = api.submit("alice's secret")
    make_user(app, "mallory")
    login(client, "mallory")
    response = client.get(f"/tasks/{task['id']}")
    assert response.status_code == 404 and "Not found" in response.get_data(as_text=True)
    assert "alice&#39;s secret" not in response.get_data(as_text=True)
    assert client.get(f"/tasks/{task['id']}/live").status_code == 404
    assert client.get(f"/tasks/{task['id']}/row").status_code == 404
    assert post_form(client, f"/tasks/{task['id']}/cancel").status_code == 404
    assert post_form(client, f"/tasks/{task['id']}/delete").status_code == 404
    assert task_row(app, task["id"]).status == "PENDING"


def test_untrusted_text_is_escaped(client, app, api):
    task = api.submit('<script>alert(1)</script><img src=x onerror=alert(2)> <a hx-get="/x">x</a>')
    login(client)
    html = client.get(f"/tasks/{task['id']}").get_data(as_text=True)
    assert "<script>alert(1)" not in html and "<img src=x" not in html and '<a hx-get="/x"' not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    history = client.get("/tasks").get_data(as_text=True)
    assert "<script>alert(1)" not in history and "&lt;script&gt;alert(1)" in history


def test_a_finished_answer_is_markdown_and_a_streaming_one_plain_text(client, app, api, fake_provider):
    fake_provider.script("md", {"chunks": ["# Title\n\n", "- a\n- b\n\n", "```\ncode <b>\n```\n"]})
    task = api.submit("md")
    login(client)
    with app.app_context():
        from webapp.extensions import db
        from webapp.models import Task

        db.session.get(Task, task["id"]).status = "PROCESSING"
        db.session.get(Task, task["id"]).result = "# Title\n\n- a"
        db.session.commit()
        db.session.remove()
    streaming = client.get(f"/tasks/{task['id']}/live").get_data(as_text=True)
    assert '<div class="text streaming"># Title\n\n- a</div>' in streaming
    with app.app_context():
        db.session.get(Task, task["id"]).status = "PENDING"
        db.session.commit()
        db.session.remove()
    work(app)
    html = client.get(f"/tasks/{task['id']}").get_data(as_text=True)
    assert "<h3>Title</h3>" in html and "<li>a</li>" in html and "<pre><code>code &lt;b&gt;" in html
    assert 'data-copy="#task-1-raw"' in html


def test_markdown_keeps_no_markup_script_links_or_images():
    html = str(
        render_markdown(
            '<script>alert(1)</script> <b onclick="x()">b</b> [j](javascript:alert(1)) [d](data:text/html,x) '
            '![p](http://evil.invalid/p.png) [ok](https://example.com "t") <div hx-get="/x">'
        )
    )
    # The only elements are a paragraph and two links; everything else stayed text.
    assert set(re.findall(r"<(/?[a-z0-9]+)", html)) == {"p", "/p", "a", "/a"}
    assert re.findall(r'href="([^"]*)"', html) == ["http://evil.invalid/p.png", "https://example.com"]
    assert '<a href="https://example.com" title="t" rel="nofollow noopener noreferrer">ok</a>' in html
    assert str(render_markdown(None)) == ""


def test_cancel_retry_delete_work_as_plain_forms(client, app, api, fake_provider):
    fake_provider.script("fails", {"status": 400})
    task = api.submit("fails")
    login(client)
    page = f"/tasks/{task['id']}"
    response = post_form(client, f"{page}/cancel", page)
    assert response.status_code == 303 and response.headers["Location"] == page
    assert "Task 1 is cancelled." in client.get(page).get_data(as_text=True)
    # Cancelling it again is a message, not an error page.
    post_form(client, f"{page}/cancel", page)
    assert "already CANCELLED and cannot be cancelled" in client.get(page).get_data(as_text=True)
    response = post_form(client, f"{page}/retry", page)
    assert response.status_code == 303 and task_row(app, task["id"]).status == "PENDING"
    work(app)
    response = post_form(client, f"{page}/delete", page)
    assert response.status_code == 303 and response.headers["Location"] == "/tasks"
    assert "Task 1 is deleted." in client.get("/tasks").get_data(as_text=True)
    assert client.get(page).status_code == 404


def test_htmx_actions_answer_with_the_partial(client, app, api):
    task = api.submit("to cancel")
    login(client)
    page = f"/tasks/{task['id']}"
    token = csrf_from(client.get(page).get_data(as_text=True))
    headers = {**HTMX, "X-CSRFToken": token}
    response = client.post(f"{page}/cancel", headers=headers)
    html = response.get_data(as_text=True)
    assert response.status_code == 200 and html.lstrip().startswith('<span id="task-announcer"')
    assert f'<section id="task-{task["id"]}"' in html and "Cancelled" in html and "hx-get" not in html
    retried = client.post(f"{page}/retry", headers=headers).get_data(as_text=True)
    assert "Pending" in retried and f'hx-get="{page}/live?seen=PENDING"' in retried
    work(app)


# -- history -----------------------------------------------------------------------------------


def row_ids(html: str) -> list[int]:
    return [int(n) for n in re.findall(r'<tr id="row-(\d+)"', html)]


def test_history_is_newest_first_with_keyset_pages(client, app, api, other_api):
    for n in range(45):
        api.submit(f"prompt {n}")
    other_api.submit("bob's prompt")
    login(client)
    first = client.get("/tasks").get_data(as_text=True)
    assert row_ids(first) == list(range(45, 25, -1)) and "bob" not in first
    older = re.search(r'href="(/tasks\?before=[^"]+)" rel="next"', first).group(1)
    second = client.get(older.replace("&amp;", "&")).get_data(as_text=True)
    assert row_ids(second) == list(range(25, 5, -1))
    third_link = re.search(r'href="(/tasks\?before=[^"]+)" rel="next"', second).group(1)
    third = client.get(third_link).get_data(as_text=True)
    assert row_ids(third) == [5, 4, 3, 2, 1] and 'rel="next"' not in third
    newer = re.search(r'href="(/tasks\?after=[^"]+)" rel="prev"', third).group(1)
    assert row_ids(client.get(newer).get_data(as_text=True)) == list(range(25, 5, -1))
    back = re.search(r'href="(/tasks\?after=[^"]+)" rel="prev"', second).group(1)
    assert row_ids(client.get(back).get_data(as_text=True)) == list(range(45, 25, -1))
    assert 'rel="prev"' not in first
    work(app)


def test_history_filters_by_status_model_and_prompt_text(client, app, api, fake_provider):
    fake_provider.script("broken 100%_", {"status": 400})
    api.submit("broken 100%_")
    api.submit("fine one", model="fake-small")
    api.submit("fine two")
    work(app)
    login(client)
    assert row_ids(client.get("/tasks?status=FAILED").get_data(as_text=True)) == [1]
    assert row_ids(client.get("/tasks?model=fake-small").get_data(as_text=True)) == [2]
    assert row_ids(client.get("/tasks?q=FINE").get_data(as_text=True)) == [3, 2]
    # LIKE wildcards in the search are literal characters.
    assert row_ids(client.get("/tasks?q=100%25_").get_data(as_text=True)) == [1]
    assert row_ids(client.get("/tasks?q=0%25").get_data(as_text=True)) == [1]
    assert row_ids(client.get("/tasks?q=%25%25x").get_data(as_text=True)) == []
    html = client.get("/tasks?q=fine&status=COMPLETED&model=fake").get_data(as_text=True)
    assert row_ids(html) == [3] and 'value="fine"' in html
    assert "No tasks match these filters." in client.get("/tasks?q=nothing-like-it").get_data(as_text=True)


def test_history_turns_bad_input_into_a_message(client, app):
    make_user(app)
    login(client)
    for query in ("?before=garbage", "?status=BOGUS", "?q=%00", "?q=" + "x" * 201):
        response = client.get("/tasks" + query)
        assert response.status_code == 422  # the page, with the message
        assert 'class="alert" role="alert"' in response.get_data(as_text=True)
        # Filtering as you type (htmx) gets the message with a 200, which htmx swaps in.
        assert client.get("/tasks" + query, headers={"HX-Request": "true"}).status_code == 200


def test_unfinished_rows_poll_themselves(client, app, api):
    task = api.submit("still running")
    login(client)
    html = client.get("/tasks").get_data(as_text=True)
    assert f'hx-get="/tasks/{task["id"]}/row" hx-trigger="load delay:2s"' in html
    work(app)
    row = client.get(f"/tasks/{task['id']}/row").get_data(as_text=True)
    assert row.lstrip().startswith(f'<tr id="row-{task["id"]}"') and "hx-get" not in row and "Completed" in row


def test_history_without_tasks_invites_a_first_one(client, app):
    make_user(app)
    login(client)
    assert "Submit your first prompt" in client.get("/tasks").get_data(as_text=True)


# -- API tokens --------------------------------------------------------------------------------


def test_tokens_are_shown_once_listed_by_prefix_and_revocable(client, app):
    make_user(app)
    login(client)
    token_csrf = csrf_from(client.get("/tokens").get_data(as_text=True))
    response = client.post("/tokens", data={"name": "my script", "csrf_token": token_csrf})
    html = response.get_data(as_text=True)
    token = re.search(r'id="new-token" class="mono" value="(atr_[^"]+)"', html).group(1)
    assert response.headers["Cache-Control"] == "no-store"
    assert client.get("/api/v1/tasks", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    listing = client.get("/tokens").get_data(as_text=True)
    assert token not in listing and f"<code>{token[:10]}…</code>" in listing and "my script" in listing
    token_id = int(re.search(r'action="/tokens/(\d+)/revoke"', listing).group(1))
    response = post_form(client, f"/tokens/{token_id}/revoke", "/tokens")
    assert response.status_code == 303
    assert client.get("/api/v1/tasks", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert "No tokens yet." in client.get("/tokens").get_data(as_text=True)


def test_a_token_needs_a_name(client, app):
    make_user(app)
    login(client)
    response = client.post("/tokens", data={"name": " ", "csrf_token": csrf_from(client.get("/tokens").text)})
    assert response.status_code == 200 and 'id="name-error">Give the token a name' in response.text


def test_nobody_revokes_another_users_token(client, app, other_api):
    make_user(app)
    login(client)
    assert post_form(client, "/tokens/1/revoke", "/tokens").status_code == 404
    assert other_api.get("/tasks").status_code == 200


def test_the_api_ignores_session_cookies(client, app):
    make_user(app)
    login(client)
    assert client.get("/api/v1/tasks").status_code == 401


def test_pages_say_so_when_the_database_is_down(client, app):
    from tests.helpers import app_with

    make_user(app)
    login(client)
    broken = app_with(app, DATABASE_URL="postgresql://root@127.0.0.1:9/test").test_client()
    # The same signed session cookie, on an app whose database is unreachable.
    broken.set_cookie("session", client.get_cookie("session").value)
    for path in ("/", "/tasks", "/tasks/1", "/login"):
        response = broken.get(path)
        assert response.status_code == 503, path
        html = response.get_data(as_text=True)
        assert "The database is unavailable" in html and 'class="card error-page"' in html
        assert response.headers["Retry-After"] == "5"


@pytest.mark.parametrize(
    "exc, status, title",
    [
        (RuntimeError("boom"), 500, "Something went wrong"),
        (ForbiddenError("This page is for administrators."), 403, "Not allowed"),
    ],
)
def test_error_pages_keep_the_sites_look(client, app, monkeypatch, exc, status, title):
    from webapp.services import tasks

    make_user(app)
    login(client)

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(tasks, "get_task", fail)
    response = client.get("/tasks/1")
    html = response.get_data(as_text=True)
    assert response.status_code == status
    assert f"<h1>{title}</h1>" in html and 'aria-label="Main"' in html and "boom" not in html
