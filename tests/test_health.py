"""Health reports real checks, and the API degrades clearly when a dependency is down."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, app_with


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
            workers = client.get("/api/v1/health").get_json()["checks"]["workers"]
            if workers.get("count"):
                break
            time.sleep(0.2)
        assert workers == {"status": "ok", "latency_ms": workers["latency_ms"], "count": 1}
    finally:
        worker.terminate()
        worker.wait(20)
