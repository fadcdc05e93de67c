"""What the server tells strangers: no redirects to a Host it does not serve, no cached admin
pages, no limits in gunicorn's own error pages, and a health check that says only healthy or not
unless the caller is an admin or the metrics scraper."""

from __future__ import annotations

import re
import socket

import pytest

from tests.helpers import api_client, app_with, login, make_user, start_gunicorn

# -- the Host header -----------------------------------------------------------------------------


def test_a_host_not_in_trusted_hosts_is_refused_not_reflected(app):
    served = app_with(app, TRUSTED_HOSTS=["tasks.example.org"])
    client = served.test_client()
    for path in ("/", "/tasks/1", "/login?next=/tasks", "/admin", "/api/v1/health"):
        response = client.get(path, headers={"Host": "evil.example"})
        assert response.status_code == 400, (path, response.status)
        assert "evil.example" not in response.headers.get("Location", "") and "evil.example" not in response.text
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/login", "/api/v1/tasks", "/tasks"):  # a POST meets the JSON depth check first
        response = client.post(
            path, data=b"[" * 100, headers={"Host": "evil.example", "Content-Type": "application/json"}
        )
        assert response.status_code == 400 and response.mimetype == "text/plain", (path, response.status)
    good = client.get("/", headers={"Host": "tasks.example.org"})
    assert good.status_code == 302 and good.headers["Location"] == "/login?next=/"


def test_trusted_hosts_is_read_from_the_environment_and_required_in_production(monkeypatch):
    from webapp import create_app

    monkeypatch.setenv("APP_ENV", "production")
    monkeypatch.setenv("SECRET_KEY", "s" * 40)
    monkeypatch.delenv("TRUSTED_HOSTS", raising=False)
    with pytest.raises(RuntimeError, match="TRUSTED_HOSTS"):
        create_app({"TESTING": True})
    monkeypatch.setenv("TRUSTED_HOSTS", "tasks.example.org, .example.net")
    assert create_app({"TESTING": True}).config["TRUSTED_HOSTS"] == ["tasks.example.org", ".example.net"]


# -- caching -------------------------------------------------------------------------------------


def test_admin_pages_and_rq_dashboard_are_never_cached(app, client):
    make_user(app, "root", admin=True)
    login(client, "root")
    for path in ("/admin", "/admin/stats", "/admin/tasks", "/admin/users", "/admin/rq/", "/admin/rq/0/view/jobs"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers.get("Cache-Control") == "no-store", path
    assert client.get("/account").headers["Cache-Control"] == "no-store"


# -- health --------------------------------------------------------------------------------------

CONTRACT = {"status", "app_name", "version", "timestamp", "checks"}


def test_anonymous_health_says_only_healthy_or_not(app, client):
    body = client.get("/api/v1/health").get_json()
    assert set(body) == CONTRACT  # the contract's shape...
    assert body["status"] == "healthy" and body["version"] is None  # ...without the version
    assert body["checks"] == {"database": {"status": "ok"}, "redis": {"status": "ok"}, "workers": {"status": "none"}}
    user = api_client(app)  # a plain user's token sees no more
    assert user.get("/health").get_json()["checks"]["database"] == {"status": "ok"}


def test_admins_and_the_metrics_token_get_the_details(app, client, monkeypatch):
    monkeypatch.setitem(app.config, "METRICS_TOKEN", "m" * 40)
    admin = api_client(app, "root", admin=True)
    for headers in (admin.headers, {"Authorization": "Bearer " + "m" * 40}):
        body = client.get("/api/v1/health", headers=headers).get_json()
        assert (
            body["version"] and "latency_ms" in body["checks"]["database"] and body["checks"]["workers"]["count"] == 0
        )
    wrong = client.get("/api/v1/health", headers={"Authorization": "Bearer " + "x" * 40})
    assert wrong.status_code == 200 and wrong.get_json()["version"] is None  # a monitor's bad token is no outage


def test_health_without_a_database_still_answers_a_token_holder(app):
    broken = app_with(app, DATABASE_URL="postgresql://root@127.0.0.1:9/test")
    token = api_client(app, "root", admin=True).headers
    response = broken.test_client().get("/api/v1/health", headers=token)
    assert response.status_code == 503 and response.get_json()["checks"]["database"] == {"status": "error"}


# -- gunicorn's own error pages --------------------------------------------------------------------


@pytest.fixture(scope="module")
def gunicorn(test_env, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("gunicorn") / "server.log"
    server, base = start_gunicorn(test_env, log_path, "--worker-class", "gthread", "--threads", "2")
    yield int(base.rsplit(":", 1)[1])
    server.terminate()
    server.wait(30)


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % n for n in range(120)) + b"\r\n", 431),
        (b"NOT-HTTP\r\n\r\n", 400),
    ],
)
def test_gunicorns_own_error_pages_carry_our_headers_and_no_limits(gunicorn, request_bytes, status):
    answer = raw_request(gunicorn, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), head
    headers = head.decode("latin-1").lower()
    for header in (
        "content-security-policy: default-src 'none'; frame-ancestors 'none'",
        "x-content-type-options: nosniff",
        "x-frame-options: deny",
        "cache-control: no-store",
        "content-type: text/plain",
    ):
        assert header in headers, (header, headers)
    assert not re.search(rb"\d{3,}", body.replace(b"%d" % status, b"")), body  # no limits or sizes
    assert b"a" * 20 not in body and b"b" * 20 not in body  # nothing of the request echoed
