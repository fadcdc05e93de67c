"""Fast checks of the recovery paths; the fault suite (tests/faults/) runs them under real faults."""

from __future__ import annotations

import time

import pytest
from rq import Queue
from rq.serializers import JSONSerializer
from sqlalchemy.exc import IntegrityError, OperationalError

from jobs import outage
from jobs.breaker import Breaker
from jobs.shutdown import drain
from tests.helpers import enqueue_scheduled_now, redis_conn, run_in_thread, task_row, wait_for, work
from webapp.extensions import db
from webapp.lifecycle import attempts
from webapp.models import Task


@pytest.fixture
def breaker_config(app, monkeypatch):
    monkeypatch.setitem(app.config, "BREAKER_FAILURES", 3)
    monkeypatch.setitem(app.config, "BREAKER_OPEN_SECONDS", 30.0)
    monkeypatch.setitem(app.config, "BREAKER_MAX_OPEN_SECONDS", 100.0)
    return app.config


def pass_the_open_period(model: str = "fake") -> None:
    """Let an open breaker's pause end now (instead of sleeping through it)."""
    redis_conn().hset(f"atr:breaker:{model}", "open_until", time.time())


# --- provider failures ----------------------------------------------------------------------


def test_a_short_retry_after_is_waited_out_in_the_same_job(app, api, fake_provider):
    prompt = "brief rate limit"
    fake_provider.script(prompt, {"status": 429, "retry_after": 0.2})
    task = api.submit(prompt)
    work(app, scheduled=False)  # no delayed job is needed: one job does both attempts
    done = api.task(task["id"])
    assert done["status"] == "COMPLETED" and done["attempts"] == 2
    assert len(fake_provider.calls_for(prompt)) == 2


def test_a_long_retry_after_hands_the_task_back(app, api, fake_provider, monkeypatch):
    monkeypatch.setitem(app.config, "RETRY_MAX_SECONDS", 300.0)
    prompt = "long rate limit"
    fake_provider.script(prompt, {"status": 429, "retry_after": 30})
    task = api.submit(prompt)
    work(app, scheduled=False)
    row = task_row(app, task["id"])
    assert row.status == "PENDING" and row.attempts == 1 and row.error_kind == "rate_limited"
    assert len(fake_provider.calls_for(prompt)) == 1


def test_breaker_opens_after_repeated_failures_and_probes_once(app, breaker_config):
    with app.app_context():
        breaker = Breaker("fake")
        breaker.success()
        assert breaker.check().allowed
        assert breaker.failure() == 0 and breaker.failure() == 0
        assert breaker.failure() == 30  # the third in a row opens it
        verdict = breaker.check()
        assert not verdict.allowed and 0 < verdict.wait <= 30
        pass_the_open_period()
        probe = breaker.check()
        assert probe.allowed and probe.probe  # half-open: one caller goes through
        assert not breaker.check().allowed  # the others wait for its verdict
        assert breaker.failure() == 60  # the probe failed: open for longer
        assert not breaker.check().allowed
        pass_the_open_period()
        assert breaker.check().probe
        breaker.success()
        assert breaker.check() == breaker.check() and breaker.check().allowed and not breaker.check().probe


def test_a_success_resets_the_count(app, breaker_config):
    with app.app_context():
        breaker = Breaker("fake")
        breaker.failure(), breaker.failure()
        breaker.success()
        assert breaker.failure() == 0 and breaker.failure() == 0


def test_an_open_breaker_defers_tasks_without_spending_attempts(app, api, fake_provider, breaker_config):
    with app.app_context():
        for _ in range(3):
            Breaker("fake").failure()
    task = api.submit("while the provider is down")
    work(app, scheduled=False)
    row = task_row(app, task["id"])
    assert row.status == "PENDING" and row.attempts == 0 and row.run_after is not None
    assert fake_provider.calls_for("while the provider is down") == []
    scheduled = Queue("default", connection=redis_conn(), serializer=JSONSerializer).scheduled_job_registry
    assert scheduled.get_job_ids() == [row.job_id]
    pass_the_open_period()  # half-open: the deferred task is the probe
    enqueue_scheduled_now(redis_conn())
    work(app)
    done = api.task(task["id"])
    assert done["status"] == "COMPLETED" and done["attempts"] == 1


def test_failures_feed_the_breaker(app, api, fake_provider, breaker_config, monkeypatch):
    monkeypatch.setitem(app.config, "RETRY_BASE_SECONDS", 60.0)  # the retries wait; we look before
    monkeypatch.setitem(app.config, "RETRY_MAX_SECONDS", 60.0)
    for i in range(3):
        fake_provider.script(f"broken {i}", {"status": 503})
        api.submit(f"broken {i}")
    work(app, scheduled=False)
    with app.app_context():
        assert Breaker("fake").remaining() > 0
    late = api.submit("after the storm")
    work(app, scheduled=False)
    assert task_row(app, late["id"]).attempts == 0  # paused, not burned


# --- hand-back ------------------------------------------------------------------------------


def test_drain_hands_a_running_task_back_with_its_attempt_refunded(app, api, fake_provider):
    prompt = "long answer at shutdown"
    fake_provider.script(prompt, {"chunks": [f"t{i} " for i in range(200)], "delay": 0.02})
    task = api.submit(prompt, params={"max_tokens": 500})
    redis_conn().flushdb()  # only the hand-back's job should be queued afterwards
    thread = run_in_thread(app, task["id"])
    wait_for(lambda: api.task(task["id"])["status"] == "PROCESSING")
    drain.request(0)
    try:
        thread.join(10)
    finally:
        drain.reset()
    row = task_row(app, task["id"])
    assert row.status == "PENDING" and row.error_kind == "shutdown"
    assert row.attempts == 1 and row.max_attempts == 4  # refunded
    queued = Queue("default", connection=redis_conn(), serializer=JSONSerializer).get_job_ids()
    assert queued == [row.job_id]
    work(app)
    assert api.task(task["id"])["status"] == "COMPLETED"


def test_release_by_job_id(app, api):
    first = api.submit("the horse died")
    last = api.submit("the horse died again")
    with app.app_context():
        db.session.query(Task).filter_by(id=last["id"]).update({"attempts": 2, "max_attempts": 3})
        db.session.commit()
        attempts.claim(first["id"], "job-a")
        attempts.claim(last["id"], "job-b")
        assert attempts.release(first["id"], "job-x", "worker_lost", "Died.", refund=False) is None  # not its job
        assert attempts.release(first["id"], "job-a", "worker_lost", "Died.", refund=False) == "PENDING"
        assert attempts.release(last["id"], "job-b", "worker_lost", "Died.", refund=False) == "FAILED"
    again = task_row(app, first["id"])
    assert again.job_id != "job-a" and again.error.endswith("It will run again.")
    assert again.job_id in Queue("default", connection=redis_conn(), serializer=JSONSerializer).get_job_ids()
    failed = task_row(app, last["id"])
    assert failed.finished_at is not None and "No attempts are left" in failed.error


def test_release_of_a_job_that_never_claimed_enqueues_a_new_one(app, api):
    task = api.submit("killed before its claim")
    job_id = task_row(app, task["id"]).job_id
    with app.app_context():
        assert attempts.release(task["id"], job_id, "worker_lost", "Died.", refund=False) == "PENDING"
    assert task_row(app, task["id"]).job_id != job_id


# --- the database going away ------------------------------------------------------------------


def test_with_database_waits_for_the_database(app):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
        return "done"

    with app.app_context():
        assert outage.with_database(flaky, seconds=10) == "done"
    assert len(calls) == 3


def test_with_database_gives_up_and_never_retries_real_errors(app):
    def broken():
        raise IntegrityError("INSERT", {}, Exception("duplicate key"))

    def down():
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    with app.app_context():
        with pytest.raises(IntegrityError):
            outage.with_database(broken, seconds=10)
        with pytest.raises(OperationalError):
            outage.with_database(down, seconds=0.5)
