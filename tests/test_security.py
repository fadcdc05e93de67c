"""Abuse limits, cookies and headers, secrets, and what error answers and logs may say."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from sqlalchemy import text

from tests.api_schema import schema
from tests.helpers import PASSWORD, ROOT, api_client, app_with, csrf_from, error_of, login, make_user, redis_conn
from webapp import config as cfg
from webapp import create_app
from webapp.extensions import db
from webapp.models import ApiToken, Task
from webapp.security import CONTENT_SECURITY_POLICY, inline_script_hashes
from webapp.services import accounts

SUBMIT = schema["/api/v1/tasks"]["POST"]


@pytest.fixture
def limits_on(app, monkeypatch):
    """Turn the rate limits on for one test (the suite runs with them off); returns a setter."""
    monkeypatch.setitem(app.config, "RATELIMIT_ENABLED", True)

    def set_limit(name: str, value):
        monkeypatch.setitem(app.config, name, value)

    return set_limit


def task_count(app) -> int:
    with app.app_context():
        count = db.session.query(Task).count()
        db.session.remove()
        return count


def queued_jobs() -> int:
    return len(redis_conn().keys("rq:job:*"))


# -- abuse limits ------------------------------------------------------------------------------


def test_submissions_per_minute_are_limited_per_user(app, api, other_api, limits_on):
    limits_on("SUBMIT_LIMIT", "3/minute")
    first = api.post("/tasks", json={"prompt": "p0"}, headers={"Idempotency-Key": "k0"})
    for n in range(1, 3):
        api.submit(f"p{n}")
    response = api.post("/tasks", json={"prompt": "one too many"})
    assert response.status_code == 429
    error = error_of(response)
    assert error["code"] == "rate_limited" and "3/minute" in error["message"]
    assert error["details"]["limit"] == "3/minute"
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    SUBMIT.validate_response(response)  # the 429 is the one the OpenAPI document describes
    # Nothing was written or queued for the refused one.
    assert task_count(app) == 3 and queued_jobs() == 3
    # A replay of an earlier submission runs nothing, so it is still answered.
    replay = api.post("/tasks", json={"prompt": "p0"}, headers={"Idempotency-Key": "k0"})
    assert replay.status_code == 202 and replay.get_json()["id"] == first.get_json()["id"]
    # Per user: someone else is not held up.
    assert other_api.post("/tasks", json={"prompt": "mine"}).status_code == 202


def test_tasks_in_flight_are_limited_and_retries_count(app, api, limits_on):
    limits_on("SUBMIT_LIMIT", "")
    limits_on("MAX_TASKS_IN_FLIGHT", 2)
    first = api.submit("one")
    api.submit("two")
    response = api.post("/tasks", json={"prompt": "three"})
    assert response.status_code == 429 and response.headers["Retry-After"] == "10"
    error = error_of(response)
    assert "2 unfinished tasks" in error["message"] and error["details"] == {"tasks_in_flight": 2, "limit": 2}
    SUBMIT.validate_response(response)
    # Finishing (here: cancelling) one makes room; retrying a finished one needs room too.
    api.post(f"/tasks/{first['id']}/cancel")
    api.submit("three")
    retry = api.post(f"/tasks/{first['id']}/retry")
    assert retry.status_code == 429
    assert api.task(first["id"])["status"] == "CANCELLED"


def test_the_form_says_so_when_limited_and_keeps_the_prompt(app, client, limits_on):
    limits_on("SUBMIT_LIMIT", "1/minute")
    make_user(app)
    login(client)
    token = csrf_from(client.get("/").text)
    assert client.post("/tasks", data={"prompt": "first", "csrf_token": token}).status_code == 303
    response = client.post("/tasks", data={"prompt": "my second prompt", "csrf_token": token})
    assert response.status_code == 429 and 1 <= int(response.headers["Retry-After"]) <= 60
    html = response.text
    assert "The task was not submitted." in html and "Too many submissions (the limit is 1/minute)" in html
    assert ">my second prompt</textarea>" in html
    assert task_count(app) == 1


def test_a_limited_retry_on_the_task_page_is_a_notice(app, client, api, limits_on):
    limits_on("SUBMIT_LIMIT", "1/minute")
    make_user(app, "bob")
    task = api.submit("to retry")  # alice's first submission of the minute
    api.post(f"/tasks/{task['id']}/cancel")
    login(client)
    page = f"/tasks/{task['id']}"
    token = csrf_from(client.get(page).text)
    response = client.post(f"{page}/retry", headers={"HX-Request": "true", "X-CSRFToken": token})
    assert response.status_code == 200 and "Too many submissions" in response.text
    assert api.task(task["id"])["status"] == "CANCELLED"


def test_ratelimit_enabled_false_turns_every_limit_off(app, client, api, monkeypatch):
    for name, value in (
        ("SUBMIT_LIMIT", "1/minute"),
        ("MAX_TASKS_IN_FLIGHT", 1),
        ("LOGIN_LIMIT_PER_ACCOUNT", "1/minute"),
    ):
        monkeypatch.setitem(app.config, name, value)
    assert app.config["RATELIMIT_ENABLED"] is False
    for n in range(3):
        api.submit(f"p{n}")
    for _ in range(3):
        assert login(client, password="wrong guess").status_code == 200
    assert redis_conn().keys("atr:limits*") == []  # nothing was even counted


def test_limits_belong_to_their_app(app, api):
    """Another app in the same process with limits on does not turn them on for this one."""
    limited = app_with(app, RATELIMIT_ENABLED=True, SUBMIT_LIMIT="1/minute")
    token = {"Authorization": f"Bearer {api.token}"}
    client = limited.test_client()
    assert client.post("/api/v1/tasks", json={"prompt": "a"}, headers=token).status_code == 202
    assert client.post("/api/v1/tasks", json={"prompt": "b"}, headers=token).status_code == 429
    for n in range(3):
        api.submit(f"unlimited {n}")  # the suite's app, limits off


def test_a_redis_outage_does_not_lock_anyone_out(app, client, monkeypatch):
    make_user(app)
    broken = app_with(app, REDIS_URL="redis://127.0.0.1:9/0", RATELIMIT_ENABLED=True, LOGIN_LIMIT_PER_ACCOUNT="1/hour")
    browser = broken.test_client()
    for _ in range(2):
        assert login(browser, password="wrong guess").status_code == 200
    assert login(browser).status_code == 302


@pytest.mark.parametrize("setting", ["SUBMIT_LIMIT", "LOGIN_LIMIT_PER_ACCOUNT", "LOGIN_LIMIT_PER_ADDRESS"])
def test_a_limit_that_does_not_parse_stops_the_app(app, setting):
    with pytest.raises(ValueError, match=setting):
        app_with(app, **{setting: "lots"})


# -- cookies and headers -----------------------------------------------------------------------


def session_cookie_header(response) -> str:
    return next(h for h in response.headers.getlist("Set-Cookie") if h.startswith("session="))


def sign_in_response(app, client, **kw):
    token = csrf_from(client.get("/login", **kw).text)
    return client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": token}, **kw)


def test_session_cookie_is_httponly_lax_and_secure_over_https(app):
    make_user(app)
    plain = session_cookie_header(sign_in_response(app, app.test_client()))
    assert "HttpOnly" in plain and "SameSite=Lax" in plain and "Secure" not in plain  # http make run works
    https = app.test_client()
    response = sign_in_response(app, https, base_url="https://localhost")
    cookie = session_cookie_header(response)
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert response.headers["Strict-Transport-Security"] == "max-age=31536000"


def test_behind_a_trusted_proxy_https_is_read_from_x_forwarded_proto(app):
    make_user(app)
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    proxied = app_with(app, TRUSTED_PROXIES=1)
    response = sign_in_response(proxied, proxied.test_client(), headers=forwarded)
    assert "Secure" in session_cookie_header(response) and "Strict-Transport-Security" in response.headers
    # Without TRUSTED_PROXIES the header is anyone's to send, so it is ignored.
    response = sign_in_response(app, app.test_client(), headers=forwarded)
    assert "Secure" not in session_cookie_header(response) and "Strict-Transport-Security" not in response.headers


def test_session_cookie_secure_forces_secure_cookies(app):
    make_user(app)
    forced = app_with(app, SESSION_COOKIE_SECURE=True)
    assert "Secure" in session_cookie_header(sign_in_response(forced, forced.test_client()))


def test_every_kind_of_response_carries_the_headers(client, app, api):
    for path in ("/login", "/static/app.js", "/api/v1/health", "/nowhere", "/api/v1/nowhere"):
        response = client.get(path)
        headers = response.headers
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["Referrer-Policy"] == "same-origin"
        assert headers["X-Frame-Options"] == "DENY"
        if response.mimetype == "text/html":
            assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
            assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
        else:
            assert headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"


def test_the_dashboard_policy_allows_exactly_its_own_inline_scripts(client, app, api):
    api.submit("a queued job")
    make_user(app, "root", admin=True)
    login(client, "root")
    for path in ("/admin/rq/", "/admin/rq/0/view/jobs", "/admin/rq/0/view/workers"):
        response = client.get(path)
        csp = response.headers["Content-Security-Policy"]
        script_src = re.search(r"script-src ([^;]*)", csp).group(1).split()
        assert "'unsafe-inline'" not in script_src and "frame-ancestors 'none'" in csp
        inline = re.findall(r'<script type="text/javascript">(.*?)</script>', response.text, re.S)
        assert inline, path
        for body in inline:
            digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
            assert f"'sha256-{digest}'" in script_src


def test_inline_script_hashes_skip_external_scripts_and_templates():
    html = (
        '<script src="/x.js"></script><script type="text/template"><b><%= x %></b></script>'
        "<script>run()</script><SCRIPT type='module'>go()</SCRIPT>"
    )
    expected = sorted(
        f"'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'" for body in (b"run()", b"go()")
    )
    assert inline_script_hashes(html) == expected


# -- secrets ------------------------------------------------------------------------------------


def test_passwords_are_hashed_with_scrypt_and_old_hashes_are_upgraded(app, client):
    from werkzeug.security import generate_password_hash

    make_user(app)
    with app.app_context():
        user = accounts.find_user("alice")
        assert user.password_hash.startswith("scrypt:32768:8:1$") and PASSWORD not in user.password_hash
        user.password_hash = generate_password_hash(PASSWORD, method="pbkdf2:sha256:1000")
        db.session.commit()
        db.session.remove()
    assert login(client).status_code == 302
    with app.app_context():
        assert accounts.find_user("alice").password_hash.startswith("scrypt:")
        db.session.remove()


def test_a_username_is_exactly_the_allowed_characters(ctx):
    from webapp.errors import ValidationError

    for name in ("eve\n", "eve\x00", " eve", "eve/..", "é"):
        with pytest.raises(ValidationError):
            accounts.create_user(name, PASSWORD)
        assert accounts.find_user(name) is None


def test_tokens_are_random_stored_hashed_and_shown_by_prefix_only(app, api):
    secret = api.token[len("atr_") :]
    assert api.token.startswith("atr_") and len(base64.urlsafe_b64decode(secret + "=")) == 32  # 256 bits
    other = api_client(app, "bob").token
    assert other != api.token
    with app.app_context():
        dump = str(db.session.execute(text("SELECT * FROM api_tokens")).all())
        row = db.session.query(ApiToken).filter_by(user_id=api.user.id).one()
        db.session.remove()
    assert secret not in dump and secret[:20] not in dump
    assert row.token_hash == hashlib.sha256(api.token.encode()).hexdigest() and row.prefix == api.token[:10]


@pytest.mark.parametrize("query", ["access_token={token}", "token={token}", "api_key={token}", "q={token}"])
def test_a_token_in_the_url_is_refused_even_with_a_good_header(app, api, query, caplog):
    caplog.set_level(logging.DEBUG)
    response = api.get(f"/tasks?{query.format(token=api.token)}")
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "never accepted in the URL" in error_of(response)["message"]
    assert api.token not in caplog.text


def test_secret_key_is_required_and_long_in_production(tmp_path):
    with pytest.raises(RuntimeError, match="SECRET_KEY is not set"):
        cfg.secret_key(None, "production", tmp_path)
    with pytest.raises(RuntimeError, match="SECRET_KEY is too short"):
        cfg.secret_key("changeme", "production", tmp_path)
    assert cfg.secret_key("x" * 32, "production", tmp_path) == "x" * 32
    # The embedded default (make run) generates one, keeps it private and reuses it.
    generated = cfg.secret_key(None, "development", tmp_path)
    assert len(generated) == 64 and (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600
    assert cfg.secret_key(None, "development", tmp_path) == generated


def test_the_app_does_not_start_in_production_without_a_secret_key(monkeypatch):
    monkeypatch.setenv("APP_ENV", "production")
    monkeypatch.delenv("SECRET_KEY", raising=False)
    with pytest.raises(RuntimeError, match="SECRET_KEY"):
        create_app({"TESTING": True})


# -- error answers and logs --------------------------------------------------------------------


def test_a_500_shows_no_traceback_and_logs_no_credentials(app, client, api, monkeypatch, caplog):
    from webapp.services import tasks

    def fail(*args, **kwargs):
        raise RuntimeError("internal detail /srv/app/secret.py")

    monkeypatch.setattr(tasks, "get_task", fail)
    caplog.set_level(logging.DEBUG)
    response = api.get("/tasks/1")
    assert response.status_code == 500
    assert error_of(response) == {
        "code": "internal_error",
        "message": "Something went wrong on our side. It has been logged; please try again.",
        "details": None,
    }
    make_user(app, "bob")
    login(client, "bob")
    page = client.get("/tasks/1")
    for body in (response.text, page.text):
        assert "Traceback" not in body and "internal detail" not in body and "secret.py" not in body
    # The traceback goes to the server's log (for the operator), without the caller's credentials.
    assert "RuntimeError: internal detail" in caplog.text
    assert api.token not in caplog.text and client.get_cookie("session").value not in caplog.text
    assert PASSWORD not in caplog.text


def test_a_database_error_logs_no_values_from_the_statement(app, api, monkeypatch, caplog):
    """SQL parameters (a prompt here; password hashes, token digests elsewhere) stay out of logs."""
    from webapp.services import tasks

    real = tasks.validate_submission

    def out_of_range(*args, **kwargs):
        submission = real(*args, **kwargs)
        return tasks.Submission(submission.prompt, submission.model, 99, submission.params)  # breaks a CHECK

    monkeypatch.setattr(tasks, "validate_submission", out_of_range)
    response = api.post("/tasks", json={"prompt": "PRIVATE-PROMPT-TEXT"})
    assert response.status_code == 500 and "PRIVATE-PROMPT-TEXT" not in response.text
    # What failed and where, not the failing row PostgreSQL describes in its DETAIL.
    assert 'IntegrityError (CheckViolation): new row for relation "tasks" violates check constraint' in caplog.text
    assert "in submit" in caplog.text and "PRIVATE-PROMPT-TEXT" not in caplog.text


def test_a_database_password_never_reaches_an_answer_or_a_log(app, client, caplog):
    make_user(app)
    login(client)
    broken = app_with(app, DATABASE_URL="postgresql://root:hunter2-secret@127.0.0.1:9/test")
    browser = broken.test_client()
    browser.set_cookie("session", client.get_cookie("session").value)
    answers = [broken.test_client().get("/api/v1/health"), browser.get("/"), browser.get("/tasks")]
    assert [a.status_code for a in answers] == [503, 503, 503]
    for answer in answers:
        assert "hunter2" not in answer.text and "127.0.0.1:9" not in answer.text
    assert "hunter2" not in caplog.text


def test_sign_in_logs_no_password(app, client, caplog):
    caplog.set_level(logging.DEBUG)
    make_user(app)
    login(client, password="a-wrong-password-attempt")
    login(client)
    assert "a-wrong-password-attempt" not in caplog.text and PASSWORD not in caplog.text


def test_the_access_log_keeps_no_query_strings(app, api, test_env, tmp_path):
    """gunicorn with the project's gunicorn.conf.py: paths and statuses logged, query strings not."""
    log_path = tmp_path / "access.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "wsgi:app", "--config", str(ROOT / "gunicorn.conf.py")]
            + ["--bind", "127.0.0.1:0", "--workers", "1", "--access-logfile", "-"],
            cwd=ROOT,
            env=test_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not (match := re.search(r"Listening at: (http://127\.0\.0\.1:\d+)", log_path.read_text())):
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        base = match.group(1)
        for path in (f"/api/v1/tasks?access_token={api.token}", "/tasks?q=private+search+words"):
            with contextlib.suppress(urllib.error.HTTPError):  # the 401 is what we want
                urllib.request.urlopen(base + path, timeout=10)
        # The access line is written just after the response: wait for both lines.
        while log_path.read_text().count('HTTP/1.1" ') < 2:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
    finally:
        server.terminate()
        server.wait(30)
    log = log_path.read_text()
    assert re.search(r'"GET /api/v1/tasks HTTP/1.1" 401 \d+ \d+ms', log), log
    assert '"GET /tasks HTTP/1.1" 302' in log
    assert api.token not in log and "private" not in log and "access_token" not in log
