"""Operations: Prometheus metrics, what Redis holds, retention, logs, the scheduler."""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import subprocess
import sys
import time
import zlib
from datetime import timedelta

import pytest

from tests.helpers import ROOT, api_client, make_user, redis_conn, scrape, seed, signed_in, work
from webapp.extensions import db
from webapp.models import Task, utcnow
from webapp.services.retention import cleanup

# Metrics


def test_metrics_guard(client, app):
    app.config["METRICS_TOKEN"] = "scrape-me"
    try:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer scrape-me"}).status_code == 200
        # An API token is not a metrics token.
        api = api_client(app, "mallory")
        assert client.get("/metrics", headers=api.headers).status_code == 401
        signed_in(app, client, "admin")
        assert client.get("/metrics").status_code == 200
        app.config["METRICS_ENABLED"] = False
        assert client.get("/metrics").status_code == 404
        assert client.get("/metrics", headers={"Authorization": "Bearer scrape-me"}).status_code == 404
    finally:
        app.config["METRICS_TOKEN"] = None
        app.config["METRICS_ENABLED"] = True


def test_no_metrics_token_configured_means_no_token_gets_in(client, app):
    assert client.get("/metrics", headers={"Authorization": "Bearer "}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer anything"}).status_code == 401


def test_metrics_count_what_workers_did(client, app, api, fake_provider):
    fake_provider.script("refused", {"status": 400})
    fake_provider.script("busy once", {"status": 429, "retry_after": 0})
    for prompt in ("one", "two", "refused", "busy once"):
        api.submit(prompt)
    api.submit("small model", model="fake-small")
    api.submit("still queued", priority=9)  # stays in the high queue: not worked below
    from rq import Queue
    from rq.serializers import JSONSerializer

    held = Queue("high", connection=redis_conn(), serializer=JSONSerializer)
    held_jobs = held.job_ids
    held.empty()
    work(app)
    for job_id in held_jobs:  # put it back, so the queue depth shows it
        redis_conn().rpush(held.key, job_id)

    signed_in(app, client, "admin")
    m = scrape(client)
    fake, small = (("model", "fake"),), (("model", "fake-small"),)
    assert m[("atr_tasks_submitted_total", fake)] == 5
    assert m[("atr_tasks_submitted_total", small)] == 1
    assert m[("atr_tasks_completed_total", fake)] == 3  # one, two, busy once
    assert m[("atr_tasks_completed_total", small)] == 1
    assert m[("atr_tasks_failed_total", (("kind", "invalid_request"), ("model", "fake")))] == 1
    assert m[("atr_task_retries_total", (("kind", "rate_limited"), ("model", "fake")))] == 1
    assert m[("atr_provider_errors_total", (("kind", "rate_limited"), ("model", "fake")))] == 1
    assert m[("atr_provider_errors_total", (("kind", "invalid_request"), ("model", "fake")))] == 1
    assert m[("atr_task_attempts_total", fake)] == 5  # 4 tasks, one of them twice
    completion = m[("atr_tokens_total", (("model", "fake"), ("type", "completion")))]
    prompt_tokens = m[("atr_tokens_total", (("model", "fake"), ("type", "prompt")))]
    assert completion > 0 and prompt_tokens > 0
    # Histograms: one run time per completed attempt, one queue wait per claim.
    assert m[("atr_task_run_seconds_count", fake)] == 3
    assert m[("atr_task_run_seconds_bucket", (("le", "+Inf"), ("model", "fake")))] == 3
    assert m[("atr_task_queue_wait_seconds_count", fake)] == 5
    assert m[("atr_task_run_seconds_sum", fake)] >= 0
    # Gauges at scrape time.
    assert m[("atr_tasks", (("status", "COMPLETED"),))] == 4
    assert m[("atr_tasks", (("status", "FAILED"),))] == 1
    assert m[("atr_tasks", (("status", "PENDING"),))] == 1
    assert m[("atr_queue_depth", (("queue", "high"),))] == 1
    assert m[("atr_queue_depth", (("queue", "default"),))] == 0
    assert m[("atr_workers", ())] == 0
    assert m[("atr_redis_up", ())] == 1


def test_buckets_are_cumulative(client, app):
    from webapp.metrics import Batch

    with app.app_context():
        for seconds in (0.1, 3, 3, 700):
            Batch().observe("atr_task_run_seconds", seconds, model="m").send()
    signed_in(app, client, "admin")
    m = scrape(client)
    bucket = {le: m[("atr_task_run_seconds_bucket", (("le", le), ("model", "m")))] for le in ("0.25", "5.0", "+Inf")}
    assert bucket == {"0.25": 1, "5.0": 3, "+Inf": 4}
    assert m[("atr_task_run_seconds_sum", (("model", "m"),))] == pytest.approx(706.1)


def test_metrics_without_redis_still_answer(client, app):
    """Redis down: the database gauges are still there, and atr_redis_up says what is missing."""
    from redis import Redis

    signed_in(app, client, "admin")
    real = app.extensions["redis"]
    app.extensions["redis"] = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        m = scrape(client)
    finally:
        app.extensions["redis"] = real
    assert m[("atr_redis_up", ())] == 0
    assert ("atr_tasks", (("status", "PENDING"),)) in m


# What Redis holds


def redis_dump(keys: list[bytes] | None = None) -> tuple[list[bytes], bytes]:
    """Return every key of the test Redis db and all their contents, whatever their type."""
    connection = redis_conn()
    keys = keys if keys is not None else list(connection.scan_iter(count=1000))
    parts: list[bytes] = []
    for key in keys:
        kind = connection.type(key)
        if kind == b"string":
            parts.append(connection.get(key) or b"")
        elif kind == b"hash":
            for field, value in connection.hgetall(key).items():
                parts += [field, value]
        elif kind == b"list":
            parts += connection.lrange(key, 0, -1)
        elif kind == b"set":
            parts += connection.smembers(key)
        elif kind == b"zset":
            parts += connection.zrange(key, 0, -1)
        elif kind == b"stream":
            for _, fields in connection.xrange(key):
                for field, value in fields.items():
                    parts += [field, value]
        else:
            parts.append(connection.dump(key) or b"")
    # RQ keeps job data zlib-compressed, and results base64-encoded (exceptions compressed too):
    # read them as the text they hold.
    for part in list(parts):
        for decode in (zlib.decompress, base64.b64decode, lambda b: zlib.decompress(base64.b64decode(b))):
            with contextlib.suppress(zlib.error, ValueError):
                parts.append(decode(part))
    return keys, b"\n".join(parts)


def test_no_prompt_or_answer_text_reaches_redis(client, app, api, fake_provider):
    marker = "Zebra-Quokka-7731"
    fake_provider.script(f"{marker} refused", {"status": 400, "message": f"bad request about {marker}"})
    fake_provider.script(f"{marker} busy", {"status": 429, "retry_after": 0})
    fake_provider.script(f"{marker} broken", {"malformed": True}, {"malformed": True}, {"malformed": True})
    done = api.submit(f"{marker} answered", params={"system": f"{marker} system"})
    for suffix in ("refused", "busy", "broken"):
        api.submit(f"{marker} {suffix}")
    cancelled = api.submit(f"{marker} cancelled")
    api.post(f"/tasks/{cancelled['id']}/cancel")
    work(app)
    assert api.task(done["id"])["result"] == f"Echo: {marker} answered"
    keys, contents = redis_dump()
    assert any(key.startswith(b"rq:job:") for key in keys) and any(key.startswith(b"rq:results:") for key in keys)
    assert b"TaskAttemptError" in contents  # failures are recorded (as ids and a kind)...
    for key in keys:
        _, one = redis_dump([key])
        assert marker.encode() not in one, key
    assert marker.encode() not in contents  # ...but no prompt, system prompt, answer or provider text


def test_a_database_error_in_a_job_is_recorded_without_its_sql(app, api, monkeypatch):
    """SQLAlchemy's error text names the statement's values (the answer); RQ must not keep it."""
    from sqlalchemy.exc import DBAPIError

    from jobs.run_task import TaskAttemptError, run_task

    task = api.submit("Wombat-2218 secret")

    def lost(*args, **kwargs):
        raise DBAPIError("UPDATE tasks SET result=%(result)s", {"result": "Wombat-2218 answer"}, Exception("x"))

    monkeypatch.setattr("webapp.lifecycle.attempts.complete", lost)
    with app.app_context(), pytest.raises(TaskAttemptError) as raised:
        run_task(task["id"])
    # Ids and an error class only; the DBAPIError (and its SQL) is not chained either.
    assert "Wombat" not in str(raised.value) and f"task {task['id']} attempt 1" in str(raised.value)
    assert raised.value.__suppress_context__ and raised.value.__cause__ is None


# Retention


def test_cleanup_deletes_only_old_finished_tasks(app, runner):
    make_user(app, "olga")
    day = 86400
    seed(
        app,
        [
            {"status": "COMPLETED", "ago": 8 * day},
            {"status": "FAILED", "ago": 9 * day, "error_kind": "timeout"},
            {"status": "CANCELLED", "ago": 30 * day},
            {"status": "COMPLETED", "ago": 8 * day},
            {"status": "COMPLETED", "ago": 6 * day},  # young enough
            {"status": "FAILED", "ago": 60},
            {"status": "PENDING", "ago": 40 * day},  # old but unfinished: never deleted
            {"status": "PROCESSING", "ago": 40 * day},
        ],
    )
    with app.app_context():
        ids = dict(db.session.query(Task.id, Task.status).all())
        assert cleanup(batch=2) == 4  # in batches of two
        left = dict(db.session.query(Task.id, Task.status).all())
    assert sorted(left.values()) == ["COMPLETED", "FAILED", "PENDING", "PROCESSING"]
    assert set(left) < set(ids)
    result = runner.invoke(args=["cleanup"])
    assert result.exit_code == 0 and "deleted 0 finished tasks older than 7 days" in result.output


def test_retention_is_configurable(app):
    make_user(app, "pat")
    seed(app, [{"status": "COMPLETED", "ago": 3 * 86400}, {"status": "COMPLETED", "ago": 86400 // 2}])
    with app.app_context():
        app.config["RETENTION_DAYS"] = 0
        try:
            assert cleanup() == 0  # 0 keeps everything
            app.config["RETENTION_DAYS"] = 2
            assert cleanup() == 1
        finally:
            app.config["RETENTION_DAYS"] = 7


def test_the_scheduler_sweeps_and_cleans_up(app, api, test_env):
    seed(app, [{"status": "COMPLETED", "ago": 10 * 86400}])
    lost = api.submit("lost by redis")
    with app.app_context():
        old = utcnow() - timedelta(minutes=5)
        db.session.query(Task).filter_by(id=lost["id"]).update({"updated_at": old, "created_at": old})
        db.session.commit()
    redis_conn().flushdb()
    env = {**test_env, "SWEEP_INTERVAL": "1", "CLEANUP_INTERVAL": "1", "LOG_FORMAT": "json"}
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "wsgi", "scheduler"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with app.app_context():
                remaining = db.session.query(Task).count()
                db.session.remove()
            queued = redis_conn().llen("rq:queue:default")
            if remaining == 1 and queued == 1:
                break
            time.sleep(0.2)
        assert remaining == 1  # the cleanup deleted the old finished task
        assert queued == 1  # the sweeper enqueued the task Redis lost
    finally:
        scheduler.send_signal(signal.SIGTERM)
        _, err = scheduler.communicate(timeout=20)
    assert scheduler.returncode == 0, err[-2000:]
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert any(line["message"].startswith("retention: deleted 1") for line in lines)


# Logs


def test_worker_logs_are_json_lines_with_task_and_job_ids(app, test_env):
    api = api_client(app)
    tasks = [api.submit(f"logged {i}") for i in range(2)]
    done = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "worker", "--burst"],
        cwd=ROOT,
        env={**test_env, "LOG_FORMAT": "json"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]  # every line is JSON
    events = [line for line in lines if line["logger"] == "jobs.events"]
    ids = {t["id"] for t in tasks}
    assert {e["task_id"] for e in events} == ids
    assert all(e["job_id"].startswith(f"task-{e['task_id']}-") for e in events)
    assert all({"time", "level", "message"} <= set(e) for e in events)
    # RQ's own worker lines go through the same formatter, and those about a job name it too.
    rq_lines = [line for line in lines if line["logger"] == "rq.worker"]
    about_jobs = [line for line in rq_lines if "task-" in line["message"]]
    assert rq_lines and about_jobs
    assert all(line["job_id"] in line["message"] and line["task_id"] in ids for line in about_jobs)
    assert all(api.task(t["id"])["status"] == "COMPLETED" for t in tasks)


def test_text_logs_carry_the_ids_too():
    import io
    import logging

    from webapp.logs import setup_logging

    stream = io.StringIO()
    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        setup_logging("INFO", "json", stream)
        logging.getLogger("jobs.events").info("hello", extra={"task_id": 7, "job_id": "task-7-ab"})
        setup_logging("INFO", "text", stream)  # replaces the handler, never stacks it
        logging.getLogger("jobs.events").info("plain")
    finally:
        for handler in list(root.handlers):
            if handler not in before[0]:
                root.removeHandler(handler)
        root.setLevel(before[1])
    first, second = stream.getvalue().splitlines()
    assert json.loads(first) | {"time": None} == {
        "time": None,
        "level": "INFO",
        "logger": "jobs.events",
        "message": "hello",
        "task_id": 7,
        "job_id": "task-7-ab",
    }
    assert second.endswith("INFO jobs.events: plain")
