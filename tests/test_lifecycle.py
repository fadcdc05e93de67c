"""The life of a task: claim, progress, fenced writes, retries per error class, cancellation."""

from __future__ import annotations

from datetime import timedelta

import pytest
from rq import Queue
from rq.serializers import JSONSerializer

from jobs.run_task import backoff_delay
from jobs.tracker import Entry, Tracker
from tests.helpers import redis_conn, run_in_thread, task_row, wait_for, work
from webapp.extensions import db
from webapp.lifecycle import attempts
from webapp.models import Task, utcnow
from webapp.queues import enqueue_task

# --- claim and fence ------------------------------------------------------------------------


def test_a_second_delivery_of_the_same_task_does_nothing(app, api, fake_provider):
    task = api.submit("only once")
    with app.app_context():
        enqueue_task(task["id"], 5, 60)  # a duplicate job for the same task
    work(app)
    assert api.task(task["id"])["status"] == "COMPLETED"
    assert len(fake_provider.calls_for("only once")) == 1


def test_a_stale_attempt_cannot_overwrite(app, api):
    task = api.submit("fenced")
    with app.app_context():
        first = attempts.claim(task["id"])
        assert first.attempt == 1
        assert attempts.claim(task["id"]) is None  # not PENDING any more
        # The sweeper took it back (the first worker looked dead); a second worker claims it.
        db.session.query(Task).filter_by(id=task["id"]).update({"status": "PENDING"})
        db.session.commit()
        second = attempts.claim(task["id"])
        assert second.attempt == 2
        # The batch writer of running attempts is fenced too: the stale attempt is told it lost the task.
        stale, fresh = Entry(first, budget=10, pieces=["stale text"]), Entry(second, budget=10)
        tracker = Tracker(app)  # not started: ticked by hand
        tracker.entries = {0: stale, 1: fresh}
        tracker.tick()
        assert stale.lost.is_set() and not fresh.lost.is_set()
        assert attempts.complete(first, "stale answer", 1, 1) is False
        assert attempts.fail(first, "x", "stale failure") is False
        assert attempts.complete(second, "fresh answer", 1, 2) is True
    row = task_row(app, task["id"])
    assert row.status == "COMPLETED" and row.result == "fresh answer" and row.attempts == 2


def test_job_arguments_are_the_task_id_only(app, api):
    task = api.submit("secret prompt text")
    connection = redis_conn()
    for key in connection.keys("rq:job:*"):
        fields = connection.hgetall(key)
        blob = b" ".join(v for v in fields.values())
        assert b"secret prompt text" not in blob
    job = Queue("default", connection=connection, serializer=JSONSerializer).jobs[0]
    assert job.args == (task["id"],) or list(job.args) == [task["id"]]
    assert job.kwargs == {}
    assert job.func_name == "jobs.run_task.run_task"


# --- progress -----------------------------------------------------------------------------


def test_progress_and_text_grow_while_processing(app, api, fake_provider):
    prompt = "stream slowly"
    fake_provider.script(prompt, {"chunks": [f"w{i} " for i in range(20)], "delay": 0.05})
    task = api.submit(prompt, params={"max_tokens": 40})
    thread = run_in_thread(app, task["id"])
    seen = wait_for(lambda: (t := api.task(task["id"]))["status"] == "PROCESSING" and t["result"] and t)
    assert 0 < seen["progress"] < 100
    assert seen["result"].startswith("w0 ")
    thread.join(10)
    done = api.task(task["id"])
    assert done["status"] == "COMPLETED" and done["progress"] == 100
    assert done["result"] == "".join(f"w{i} " for i in range(20))
    assert len(done["result"]) > len(seen["result"])


def test_priority_routes_to_queues_and_high_runs_first(app, api, fake_provider):
    low = api.submit("low one", priority=2)
    default = api.submit("default one", priority=5)
    high = api.submit("high one", priority=9)
    connection = redis_conn()
    lengths = {name: Queue(name, connection=connection).count for name in ("high", "default", "low")}
    assert lengths == {"high": 1, "default": 1, "low": 1}
    work(app)
    order = [call.prompt for call in fake_provider.calls]
    assert order == ["high one", "default one", "low one"]
    assert all(api.task(t["id"])["status"] == "COMPLETED" for t in (low, default, high))


# --- errors, retries and giving up ---------------------------------------------------------


@pytest.mark.parametrize(
    "step, kind",
    [
        ({"status": 429, "retry_after": 0}, "rate_limited"),
        ({"status": 500}, "provider_error"),
        ({"status": 503}, "provider_error"),
        ({"hang": 4}, "timeout"),
        ({"malformed": True}, "bad_response"),
        ({"chunks": [" "]}, "empty_answer"),
    ],
)
def test_transient_errors_are_retried(app, api, fake_provider, step, kind):
    prompt = f"transient {kind}"
    fake_provider.script(prompt, step)
    task = api.submit(prompt)
    work(app)
    done = api.task(task["id"])
    assert done["status"] == "COMPLETED", done
    assert done["attempts"] == 2
    assert done["result"] == f"Echo: {prompt}"
    assert len(fake_provider.calls_for(prompt)) == 2


def test_connection_refused_is_transient(app, api, fake_provider, monkeypatch):
    from webapp.catalog import ModelSpec, catalog

    with app.app_context():
        cat = catalog()
        monkeypatch.setitem(
            cat.models, "fake-down", ModelSpec(name="fake-down", base_url="http://127.0.0.1:9/v1", upstream="x")
        )
    task = api.submit("nobody home", model="fake-down")
    work(app)
    done = api.task(task["id"])
    assert done["status"] == "FAILED"
    assert done["attempts"] == 3
    assert "Could not reach the provider" in done["error"] and "Gave up after 3 attempts" in done["error"]


@pytest.mark.parametrize(
    "status, words",
    [
        (400, "rejected the request"),
        (401, "refused our credentials"),
        (403, "refused our credentials"),
        (404, "does not know this model"),
        (422, "rejected the request"),
    ],
)
def test_permanent_errors_fail_at_once(app, api, fake_provider, status, words):
    prompt = f"permanent {status}"
    fake_provider.script(prompt, {"status": status, "message": "upstream says no"})
    task = api.submit(prompt)
    work(app)
    done = api.task(task["id"])
    assert done["status"] == "FAILED"
    assert done["attempts"] == 1
    assert words in done["error"] and f"HTTP {status}" in done["error"]
    assert "upstream says no" in done["error"]
    assert len(fake_provider.calls_for(prompt)) == 1
    assert done["finished_at"] is not None


def test_gives_up_after_the_configured_attempts(app, api, fake_provider, monkeypatch):
    monkeypatch.setitem(app.config, "BREAKER_FAILURES", 100)  # five 500s in a row would pause the model
    prompt = "always broken"
    fake_provider.script(prompt, *[{"status": 500}] * 5)
    task = api.submit(prompt)
    work(app)
    done = api.task(task["id"])
    assert done["status"] == "FAILED"
    assert done["attempts"] == app.config["TASK_MAX_ATTEMPTS"] == 3
    assert "Gave up after 3 attempts" in done["error"]
    assert len(fake_provider.calls_for(prompt)) == 3
    # A user retry grants a fresh set of attempts.
    assert api.post(f"/tasks/{task['id']}/retry").status_code == 202
    work(app)
    again = api.task(task["id"])
    assert again["status"] == "COMPLETED" and again["attempts"] == 6 and again["error"] is None


def test_a_failed_attempt_is_recorded_by_rq_without_the_prompt(app, api, fake_provider):
    from rq.registry import FailedJobRegistry

    prompt = "a very private prompt"
    fake_provider.script(prompt, {"status": 400})
    api.submit(prompt)
    work(app)
    registry = FailedJobRegistry("default", connection=redis_conn(), serializer=JSONSerializer)
    job_ids = registry.get_job_ids()
    assert len(job_ids) == 1
    job = registry.job_class.fetch(job_ids[0], connection=redis_conn(), serializer=JSONSerializer)
    assert "invalid_request" in job.latest_result().exc_string
    assert prompt not in job.latest_result().exc_string


def test_backoff_is_exponential_with_jitter_and_honours_retry_after(app, monkeypatch):
    with app.app_context():
        monkeypatch.setitem(app.config, "RETRY_BASE_SECONDS", 2.0)
        monkeypatch.setitem(app.config, "RETRY_MAX_SECONDS", 300.0)
        firsts = [backoff_delay(1, None) for _ in range(200)]
        thirds = [backoff_delay(3, None) for _ in range(200)]
        assert all(0 <= d <= 2 for d in firsts) and all(0 <= d <= 8 for d in thirds)
        assert len(set(firsts)) > 150  # jittered, not a fixed schedule
        assert max(thirds) > 2  # the ceiling grows
        assert all(backoff_delay(1, 30) >= 30 for _ in range(50))
        assert backoff_delay(20, None) <= 300
        assert backoff_delay(1, 10_000) == 300


def test_retry_after_sets_when_the_next_attempt_is_due(app, api, fake_provider, monkeypatch):
    monkeypatch.setitem(app.config, "RETRY_MAX_SECONDS", 300.0)
    prompt = "slow down"
    fake_provider.script(prompt, {"status": 429, "retry_after": 120})
    task = api.submit(prompt)
    work(app, scheduled=False)
    row = task_row(app, task["id"])
    assert row.status == "PENDING" and row.error_kind == "rate_limited"
    assert "asked to wait 120 s" in row.error
    assert row.run_after - utcnow() > timedelta(seconds=110)
    scheduled = Queue("default", connection=redis_conn(), serializer=JSONSerializer).scheduled_job_registry
    assert scheduled.get_job_ids() == [row.job_id]


def test_unknown_model_at_run_time_fails_clearly(app, api):
    task = api.submit("orphan model")
    with app.app_context():
        db.session.query(Task).filter_by(id=task["id"]).update({"model": "retired-model"})
        db.session.commit()
    work(app)
    done = api.task(task["id"])
    assert done["status"] == "FAILED" and "no longer offered" in done["error"]


# --- cancellation and deletion while running -------------------------------------------------


def test_cancel_a_running_task_stops_the_worker(app, api, fake_provider):
    prompt = "long answer"
    fake_provider.script(prompt, {"chunks": [f"t{i} " for i in range(200)], "delay": 0.02})
    task = api.submit(prompt, params={"max_tokens": 500})
    thread = run_in_thread(app, task["id"])
    wait_for(lambda: api.task(task["id"])["status"] == "PROCESSING")
    response = api.post(f"/tasks/{task['id']}/cancel")
    assert response.status_code == 200 and response.get_json()["status"] == "CANCELLED"
    thread.join(10)
    assert not thread.is_alive()
    done = api.task(task["id"])
    assert done["status"] == "CANCELLED" and done["error"] == "Cancelled by the user."
    call = fake_provider.calls_for(prompt)[0]
    wait_for(lambda: call.outcome or call.disconnected, timeout=5)
    assert call.chunks_sent < 200  # the worker hung up instead of reading the whole answer


def test_delete_a_running_task(app, api, fake_provider):
    prompt = "delete while running"
    fake_provider.script(prompt, {"chunks": [f"t{i} " for i in range(200)], "delay": 0.02})
    task = api.submit(prompt, params={"max_tokens": 500})
    thread = run_in_thread(app, task["id"])
    wait_for(lambda: api.task(task["id"])["status"] == "PROCESSING")
    assert api.delete(f"/tasks/{task['id']}").status_code == 204
    thread.join(10)
    assert not thread.is_alive()
    assert api.get(f"/tasks/{task['id']}").status_code == 404


def test_cancel_a_task_waiting_for_a_retry(app, api, fake_provider, monkeypatch):
    monkeypatch.setitem(app.config, "RETRY_MAX_SECONDS", 300.0)
    prompt = "waiting to retry"
    fake_provider.script(prompt, {"status": 429, "retry_after": 100})
    task = api.submit(prompt)
    work(app, scheduled=False)
    assert api.post(f"/tasks/{task['id']}/cancel").status_code == 200
    work(app)  # even if the delayed job runs, it finds nothing to do
    assert api.task(task["id"])["status"] == "CANCELLED"
    assert len(fake_provider.calls_for(prompt)) == 1
