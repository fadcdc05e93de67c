"""Health reports real checks, and the API degrades clearly when a dependency is down."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, api_client, app_with


def test_unhealthy_when_redis_is_down(app):
    broken = app_with(app, REDIS_URL="redis://127.0.0.1:9/0")
    response = broken.test_client().get("/api/v1/health")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unhealthy"
    assert body["checks"]["redis"]["status"] == "error"
    assert body["checks"]["database"]["status"] == "ok"
    assert "127.0.0.1" not in str(body)  # no connection details leak


def test_unhealthy_when_the_database_is_down(app):
    broken = app_with(app, DATABASE_URL="postgresql://root@127.0.0.1:9/test")
    body = broken.test_client().get("/api/v1/health").get_json()
    assert body["status"] == "unhealthy"
    assert body["checks"]["database"]["status"] == "error"
    assert body["checks"]["redis"]["status"] == "ok"


def test_api_answers_503_when_the_database_is_down(app, api):
    broken = app_with(app, DATABASE_URL="postgresql://root@127.0.0.1:9/test")
    response = broken.test_client().post("/api/v1/tasks", json={"prompt": "hi"}, headers=api.headers)
    assert response.status_code == 503
    error = response.get_json()["error"]
    assert error["code"] == "unavailable" and "database" in error["message"]
    assert response.headers["Retry-After"]


def test_submit_while_redis_is_down_is_kept_for_the_sweeper(app, api):
    broken = app_with(app, REDIS_URL="redis://127.0.0.1:9/0")
    response = broken.test_client().post("/api/v1/tasks", json={"prompt": "kept"}, headers=api.headers)
    # The row is the record: it is accepted, and the sweeper enqueues it once Redis is back.
    assert response.status_code == 202
    task = api.task(response.get_json()["id"])
    assert task["status"] == "PENDING"


@pytest.mark.timeout(60)
def test_workers_are_counted(app, client, test_env):
    admin = api_client(app, "root", admin=True)  # the count is a detail: for admins (and METRICS_TOKEN)
    worker = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "wsgi", "worker", "--name", "health-check-worker"],
        cwd=ROOT,
        env=test_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            workers = client.get("/api/v1/health", headers=admin.headers).get_json()["checks"]["workers"]
            if workers.get("count"):
                break
            time.sleep(0.2)
        assert workers == {"status": "ok", "latency_ms": workers["latency_ms"], "count": 1}
    finally:
        worker.terminate()
        worker.wait(20)


def test_a_worker_that_died_silently_is_not_counted_and_the_sweeper_forgets_it(app):
    from datetime import timedelta

    from rq import Worker
    from rq.utils import now

    from jobs.sweeper import sweep
    from tests.helpers import redis_conn
    from webapp.queues import WORKER_SILENT_SECONDS

    admin = api_client(app, "root", admin=True)
    connection = redis_conn()
    alive, dead = (
        Worker(["default"], name="alive", connection=connection),
        Worker(["default"], name="dead", connection=connection),
    )
    for worker in (alive, dead):
        worker.register_birth()
        worker.heartbeat()
    # Killed a while ago: registered still (its key lives for minutes), but silent.
    stale = now() - timedelta(seconds=WORKER_SILENT_SECONDS + 5)
    connection.hset(dead.key, "last_heartbeat", stale.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    assert {w.name for w in Worker.all(connection=connection)} == {"alive", "dead"}

    health = admin.get("/health").get_json()
    assert health["checks"]["workers"]["count"] == 1

    with app.app_context():
        sweep()
    assert [w.name for w in Worker.all(connection=connection)] == ["alive"]  # rq-dashboard lists the living
