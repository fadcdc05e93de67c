"""The sweeper: lost jobs are enqueued again, dead workers' tasks are taken back."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from rq import Queue
from rq.serializers import JSONSerializer

from jobs.sweeper import ADVISORY_LOCK, SCHEDULER_SLACK, sweep
from tests.helpers import age, redis_conn, task_row, work
from webapp.extensions import db
from webapp.lifecycle import attempts
from webapp.models import Task, utcnow


def test_pending_tasks_lost_by_redis_are_enqueued_again(app, api):
    tasks = [api.submit(f"lost {i}") for i in range(3)]
    redis_conn().flushdb()  # Redis lost everything
    for task in tasks:
        age(app, task["id"], 120)
    with app.app_context():
        report = sweep()
    assert sorted(report.requeued) == [t["id"] for t in tasks]
    work(app)
    assert all(api.task(t["id"])["status"] == "COMPLETED" for t in tasks)


def test_queued_tasks_are_left_alone(app, api, fake_provider):
    task = api.submit("still queued")
    age(app, task["id"], 120)
    with app.app_context():
        assert sweep().requeued == []
    work(app)
    assert len(fake_provider.calls_for("still queued")) == 1


def test_a_fresh_task_without_a_job_gets_a_grace_period(app, api):
    task = api.submit("just committed")
    with app.app_context():
        db.session.query(Task).filter_by(id=task["id"]).update({"job_id": None})
        db.session.commit()
        redis_conn().flushdb()
        assert sweep().requeued == []  # its enqueue may still be under way
    age(app, task["id"], 120)
    with app.app_context():
        assert sweep().requeued == [task["id"]]


def test_expired_lease_goes_back_to_pending_and_runs_again(app, api, fake_provider):
    task = api.submit("worker died")
    with app.app_context():
        claimed = attempts.claim(task["id"])  # a worker took it... and died
        db.session.query(Task).filter_by(id=task["id"]).update({"lease_expires_at": utcnow() - timedelta(seconds=1)})
        db.session.commit()
        redis_conn().flushdb()
        report = sweep()
    assert report.reclaimed == [task["id"]] and report.requeued == [task["id"]]
    row = task_row(app, task["id"])
    assert row.status == "PENDING" and row.error_kind == "worker_lost"
    work(app)
    done = api.task(task["id"])
    assert done["status"] == "COMPLETED" and done["attempts"] == 2
    with app.app_context():
        assert attempts.complete(claimed, "late answer from the dead worker", 1, 1) is False


def test_expired_lease_with_no_attempts_left_fails(app, api):
    task = api.submit("out of attempts")
    with app.app_context():
        db.session.query(Task).filter_by(id=task["id"]).update(
            {
                "status": "PROCESSING",
                "attempts": 3,
                "max_attempts": 3,
                "lease_expires_at": utcnow() - timedelta(seconds=1),
            }
        )
        db.session.commit()
        report = sweep()
    assert report.failed == [task["id"]]
    done = api.task(task["id"])
    assert done["status"] == "FAILED" and "stopped responding" in done["error"]


def test_delayed_jobs_left_by_a_dead_scheduler_are_moved_to_their_queue(app, api, fake_provider):
    """A killed worker keeps RQ's scheduler lock for a minute; the sweeper moves late delayed jobs."""
    late, early = api.submit("deferred long ago"), api.submit("deferred just now")
    connection = redis_conn()
    queue = Queue("default", connection=connection, serializer=JSONSerializer)
    registry = queue.scheduled_job_registry
    connection.delete(queue.key)  # both jobs wait in the scheduled registry instead
    with app.app_context():
        for task, due in ((late, time.time() - SCHEDULER_SLACK - 2), (early, time.time() + 30)):
            job_id = task_row(app, task["id"]).job_id
            queue.schedule_job(queue.fetch_job(job_id), datetime.fromtimestamp(due, UTC))
        report = sweep()
    assert report.overdue == [task_row(app, late["id"]).job_id]
    assert queue.get_job_ids() == report.overdue
    assert registry.get_job_ids() == [task_row(app, early["id"]).job_id]
    work(app, scheduled=False)
    assert api.task(late["id"])["status"] == "COMPLETED"
    assert api.task(early["id"])["status"] == "PENDING"
    with app.app_context():
        assert sweep().overdue == []  # moved once


def test_a_live_lease_is_not_touched(app, api):
    task = api.submit("alive")
    with app.app_context():
        attempts.claim(task["id"])
        report = sweep()
    assert report.reclaimed == [] and report.failed == []
    assert task_row(app, task["id"]).status == "PROCESSING"


def test_only_one_sweeper_at_a_time(app, api):
    """Another process holding the advisory lock makes a pass skip; its death frees the lock."""
    from sqlalchemy import create_engine, text

    from tests.helpers import TEST_DATABASE_URL

    other = create_engine(TEST_DATABASE_URL.replace("postgresql://", "postgresql+psycopg2://"))
    with other.connect() as connection:
        assert connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": ADVISORY_LOCK})
        with app.app_context():
            assert sweep().skipped
    other.dispose()  # the holder's session ends: PostgreSQL releases its lock as its backend exits
    with app.app_context():
        # The backend exits just after the socket closes; wait (bounded) until its lock is gone.
        held = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = :key AND granted")
        deadline = time.monotonic() + 10
        while db.session.scalar(held, {"key": ADVISORY_LOCK}) and time.monotonic() < deadline:
            db.session.rollback()
            time.sleep(0.05)
        db.session.rollback()
        assert not sweep().skipped
        assert not sweep().skipped  # and we released ours


def test_sweep_command(runner, api):
    result = runner.invoke(args=["sweep"])
    assert result.exit_code == 0
    assert "0 re-enqueued" in result.output
