"""Webhook deliveries to a real receiver on loopback, verified with the `standardwebhooks` package.

The `receiver` and `hooks` fixtures are in tests/conftest.py."""

from __future__ import annotations

import signal
import subprocess
import sys
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from jobs.sweeper import sweep
from tests.helpers import ROOT, redis_conn, work
from tests.receiver import deliver_all
from webapp import lifecycle, outbox
from webapp.extensions import db
from webapp.lifecycle import attempts
from webapp.models import Task, utcnow
from webapp.services import admin, retention
from webapp.services import webhooks as service
from webapp.webhook_models import WebhookDelivery, WebhookEndpoint

_tasks = Task.__table__


def endpoint_for(app, api, url, events=("task.completed", "task.failed")) -> tuple[int, str]:
    response = api.post("/webhooks", json={"url": url, "events": list(events)})
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    return body["id"], body["secret"]


def finish(app, task_id: int, status: str = "COMPLETED", commit: bool = True) -> list[int]:
    """Finish a task the way the lifecycle does: one transaction writes the change and its outbox rows."""
    with app.app_context():
        connection = db.engine.connect()
        transaction = connection.begin()
        rows = connection.execute(
            update(_tasks)
            .where(_tasks.c.id == task_id)
            .values(status=status, result="Paris.", progress=100, finished_at=utcnow())
            .returning(*_tasks.c)
        ).mappings()
        ids = outbox.record_task_events(connection, [dict(r) for r in rows])
        (transaction.commit if commit else transaction.rollback)()
        connection.close()
        return ids


def deliveries(app) -> list[WebhookDelivery]:
    with app.app_context():
        rows = list(db.session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))
        db.session.expunge_all()
        return rows


def test_a_finished_task_is_delivered_signed_with_the_task(app, api, hooks, receiver):
    _, secret = endpoint_for(app, api, receiver.url)
    task = api.submit("What is the capital of France?")
    finish(app, task["id"])
    deliver_all(app)
    (got,) = receiver.wait_for(1)
    payload = got.verify(secret)  # raises unless the signature and timestamp are right
    assert payload["type"] == "task.completed"
    assert payload["data"]["id"] == task["id"] and payload["data"]["status"] == "COMPLETED"
    assert payload["data"]["result"] == "Paris." and payload["data"] == api.task(task["id"])
    assert payload["timestamp"].endswith("Z")
    assert got.headers["webhook-id"].startswith("msg_")
    assert got.headers["Content-Type"] == "application/json"
    (row,) = deliveries(app)
    assert row.status == "delivered" and row.attempts == 1 and row.last_status_code == 204


def test_only_subscribed_events_and_only_the_owners_endpoints(app, api, other_api, hooks, receiver):
    endpoint_for(app, api, receiver.url, events=("task.failed",))
    endpoint_for(app, other_api, receiver.url, events=("task.completed",))
    task = api.submit()
    assert finish(app, task["id"], "COMPLETED") == []
    deliver_all(app)
    assert receiver.received == []


def test_a_rolled_back_change_sends_nothing(app, api, hooks, receiver):
    endpoint_for(app, api, receiver.url)
    task = api.submit()
    assert finish(app, task["id"], commit=False)  # rows were written, then rolled back
    deliver_all(app)
    assert deliveries(app) == [] and receiver.received == []
    assert api.task(task["id"])["status"] == "PENDING"


def test_a_failed_try_is_retried_with_the_same_webhook_id(app, api, hooks, receiver):
    _, secret = endpoint_for(app, api, receiver.url)
    receiver.answer(500, (503, {"Retry-After": "1"}, 0.0), 200)
    finish(app, api.submit()["id"])
    deliver_all(app)
    tries = receiver.wait_for(3)
    assert len(tries) == 3
    assert len({t.headers["webhook-id"] for t in tries}) == 1
    for attempt in tries:
        attempt.verify(secret)
    (row,) = deliveries(app)
    assert row.status == "delivered" and row.attempts == 3 and row.last_status_code == 200


def test_after_the_last_try_the_delivery_is_failed(app, api, hooks, receiver):
    endpoint_for(app, api, receiver.url)
    receiver.answer(500, 500, 500)
    finish(app, api.submit()["id"])
    deliver_all(app)
    assert len(receiver.wait_for(3)) == 3  # one try and one per delay ("5,300")
    (row,) = deliveries(app)
    assert row.status == "failed" and row.attempts == 3 and row.last_status_code == 500


def test_redirects_are_not_followed(app, api, hooks, receiver):
    endpoint_for(app, api, receiver.url)
    hooks["WEBHOOK_RETRY_DELAYS"] = ""
    receiver.answer((302, {"Location": receiver.url + "/elsewhere"}, 0.0))
    finish(app, api.submit()["id"])
    deliver_all(app)
    assert [r.path for r in receiver.wait_for(1)] == ["/hooks"]
    (row,) = deliveries(app)
    assert row.status == "failed" and row.last_status_code == 302


def test_a_slow_receiver_times_out(app, api, hooks, receiver):
    endpoint_for(app, api, receiver.url)
    hooks["WEBHOOK_RETRY_DELAYS"] = ""
    receiver.answer((200, {}, 3.0))
    finish(app, api.submit()["id"])
    deliver_all(app)
    (row,) = deliveries(app)
    assert row.status == "failed" and row.last_status_code is None
    assert "No answer within 1 s" in row.last_error


def test_the_address_is_checked_again_at_connect_time(app, api, hooks, receiver):
    endpoint_for(app, api, receiver.url)
    hooks["WEBHOOK_RETRY_DELAYS"] = ""
    hooks["WEBHOOK_ALLOW_LOOPBACK"] = False  # what registration allowed, the connection refuses
    finish(app, api.submit()["id"])
    deliver_all(app)
    (row,) = deliveries(app)
    assert row.status == "failed" and "Refused before connecting" in row.last_error and "loopback" in row.last_error
    assert receiver.received == []


def test_410_gone_disables_the_endpoint(app, api, hooks, receiver):
    endpoint_id, _ = endpoint_for(app, api, receiver.url)
    receiver.answer(410)
    finish(app, api.submit()["id"])
    finish(app, api.submit()["id"])
    deliver_all(app)
    assert len(receiver.received) == 1  # the second was not sent
    assert [r.status for r in deliveries(app)] == ["failed", "failed"]
    (endpoint,) = api.get("/webhooks").get_json()["items"]
    assert endpoint["enabled"] is False and "410" in endpoint["disabled_reason"]
    assert finish(app, api.submit()["id"]) == []  # a disabled endpoint gets no new deliveries


def test_an_endpoint_failing_for_five_days_is_disabled(app, api, hooks, receiver):
    endpoint_id, _ = endpoint_for(app, api, receiver.url)
    with app.app_context():
        db.session.execute(update(WebhookEndpoint).values(failing_since=utcnow() - timedelta(days=5, minutes=1)))
        db.session.commit()
    receiver.answer(500)
    finish(app, api.submit()["id"])
    deliver_all(app)
    (endpoint,) = api.get("/webhooks").get_json()["items"]
    assert endpoint["enabled"] is False and "failed for 5 days" in endpoint["disabled_reason"]
    assert len(receiver.received) == 1


def test_a_success_clears_failing_since(app, api, hooks, receiver):
    endpoint_for(app, api, receiver.url)
    receiver.answer(500, 200)
    finish(app, api.submit()["id"])
    deliver_all(app)
    (endpoint,) = api.get("/webhooks").get_json()["items"]
    assert endpoint["enabled"] is True and endpoint["failing_since"] is None


def test_the_sweep_delivers_what_redis_lost(app, api, hooks, receiver):
    _, secret = endpoint_for(app, api, receiver.url)
    finish(app, api.submit()["id"])
    redis_conn().flushdb()  # the job is gone; the row is the record
    with app.app_context():
        db.session.execute(update(WebhookDelivery).values(next_attempt_at=utcnow() - timedelta(minutes=5)))
        db.session.commit()
        assert outbox.sweep() == 1
    deliver_all(app)
    receiver.wait_for(1)[0].verify(secret)
    assert deliveries(app)[0].status == "delivered"


def test_a_duplicate_job_sends_once(app, api, hooks, receiver):
    endpoint_for(app, api, receiver.url)
    (delivery_id,) = finish(app, api.submit()["id"])
    with app.app_context():
        outbox.enqueue(delivery_id)  # as a sweep racing the first job would
    deliver_all(app)
    assert len(receiver.wait_for(1)) == 1


def test_a_rotated_secret_signs_with_both_during_the_overlap(app, api, hooks, receiver):
    endpoint_id, old = endpoint_for(app, api, receiver.url)
    with app.app_context():
        new = service.rotate_secret(_user(api), endpoint_id)
    assert new != old and new.startswith("whsec_")
    finish(app, api.submit()["id"])
    deliver_all(app)
    (got,) = receiver.wait_for(1)
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    got.verify(old)
    got.verify(new)
    with app.app_context():
        db.session.execute(update(WebhookEndpoint).values(previous_secret_expires_at=utcnow()))
        db.session.commit()
    finish(app, api.submit()["id"])
    deliver_all(app)
    later = receiver.wait_for(2)[1]
    later.verify(new)
    with pytest.raises(Exception, match="No matching signature"):
        later.verify(old)


def test_resend_sends_the_same_event_again(app, api, hooks, receiver):
    _, secret = endpoint_for(app, api, receiver.url)
    hooks["WEBHOOK_RETRY_DELAYS"] = ""
    receiver.answer(500)
    (delivery_id,) = finish(app, api.submit()["id"])
    deliver_all(app)
    assert deliveries(app)[0].status == "failed"
    with app.app_context():
        service.resend(_user(api), delivery_id)
    deliver_all(app)
    first, second = receiver.wait_for(2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] and first.body == second.body
    second.verify(secret)
    assert deliveries(app)[0].status == "delivered"


def test_a_test_event_goes_whatever_the_subscription(app, api, hooks, receiver):
    endpoint_id, secret = endpoint_for(app, api, receiver.url, events=("batch.expired",))
    with app.app_context():
        service.send_test(_user(api), endpoint_id)
    deliver_all(app)
    assert receiver.wait_for(1)[0].verify(secret)["type"] == "webhook.test"


def test_retention_deletes_old_finished_deliveries_only(app, api, hooks, receiver):
    endpoint_for(app, api, receiver.url)
    finish(app, api.submit()["id"])
    deliver_all(app)
    finish(app, api.submit()["id"])  # still pending
    with app.app_context():
        db.session.execute(update(WebhookDelivery).values(created_at=utcnow() - timedelta(days=8)))
        db.session.commit()
        assert retention.cleanup_deliveries() == 1
    assert [r.status for r in deliveries(app)] == ["pending"]


def test_metrics_count_outcomes_and_the_oldest_undelivered(app, api, hooks, receiver, test_env):
    endpoint_for(app, api, receiver.url)
    receiver.answer(500)
    finish(app, api.submit()["id"])
    deliver_all(app, rounds=1)
    app.config["METRICS_TOKEN"] = "m-token"
    try:
        text = api.client.get("/metrics", headers={"Authorization": "Bearer m-token"}).get_data(as_text=True)
    finally:
        app.config["METRICS_TOKEN"] = None
    assert 'atr_webhook_deliveries_total{outcome="retried"} 1.0' in text
    line = next(x for x in text.splitlines() if x.startswith("atr_webhook_oldest_undelivered_seconds "))
    assert float(line.split()[1]) >= 0


def _user(api):
    from webapp.models import User

    return db.session.get(User, api.user.id)


FINISH_AND_DIE = """
import os, signal, sys
from sqlalchemy import update
from webapp import create_app
from webapp.extensions import db
from webapp.models import Task, utcnow
from webapp import lifecycle, outbox
from webapp.lifecycle import attempts

app = create_app()
tasks = Task.__table__
with app.app_context():
    with db.engine.begin() as connection:
        rows = connection.execute(
            update(tasks).where(tasks.c.id == int(sys.argv[1]))
            .values(status="COMPLETED", result="Paris.", progress=100, finished_at=utcnow())
            .returning(*tasks.c)
        ).mappings()
        outbox.record_task_events(connection, [dict(r) for r in rows])
    os.kill(os.getpid(), signal.SIGKILL)  # dead right after the commit
"""


def test_a_process_killed_after_the_commit_still_delivers(app, api, hooks, receiver, test_env, tmp_path):
    _, secret = endpoint_for(app, api, receiver.url)
    task = api.submit()
    script = tmp_path / "finish_and_die.py"
    script.write_text(FINISH_AND_DIE)
    # Its Redis is a closed port: the commit happens, the wake-up job is never enqueued.
    env = {**test_env, "REDIS_URL": "redis://127.0.0.1:9/0"}
    done = subprocess.run([sys.executable, str(script), str(task["id"])], env=env, cwd=ROOT, timeout=60)
    assert done.returncode == -signal.SIGKILL
    assert api.task(task["id"])["status"] == "COMPLETED"
    (row,) = deliveries(app)
    assert row.status == "pending"
    deliver_all(app)
    assert receiver.received == []  # no job: only the record knows
    with app.app_context():
        db.session.execute(update(WebhookDelivery).values(next_attempt_at=utcnow() - timedelta(minutes=2)))
        db.session.commit()
        assert outbox.sweep() == 1  # what the scheduler runs every SWEEP_INTERVAL
    deliver_all(app)
    assert receiver.wait_for(1)[0].verify(secret)["data"]["id"] == task["id"]


# The lifecycle's own paths: every way a task finishes writes its outbox rows in that change's
# transaction (webapp/lifecycle/hooks.py `_finished`), and they are delivered, signed.

ALL_TASK_EVENTS = ("task.completed", "task.failed", "task.cancelled")


def delivered(app, receiver, secret: str, count: int = 1) -> list[dict]:
    deliver_all(app)
    return [got.verify(secret) for got in receiver.wait_for(count)]


def test_a_task_a_worker_completes_is_delivered(app, api, hooks, receiver):
    _, secret = endpoint_for(app, api, receiver.url, ALL_TASK_EVENTS)
    task = api.submit("What is the capital of France?")
    work(app)
    (payload,) = delivered(app, receiver, secret)
    assert payload["type"] == "task.completed"
    assert payload["data"] == api.task(task["id"]) and payload["data"]["status"] == "COMPLETED"


def test_a_task_a_worker_fails_is_delivered(app, api, hooks, receiver, fake_provider):
    _, secret = endpoint_for(app, api, receiver.url, ALL_TASK_EVENTS)
    prompt = "Refused by the provider (delivered)"
    fake_provider.script(prompt, {"status": 400, "message": "bad request"})
    task = api.submit(prompt)
    work(app)
    (payload,) = delivered(app, receiver, secret)
    assert payload["type"] == "task.failed"
    assert payload["data"] == api.task(task["id"]) and payload["data"]["status"] == "FAILED"


def test_a_task_taken_back_for_good_by_the_sweeper_is_delivered(app, api, hooks, receiver):
    _, secret = endpoint_for(app, api, receiver.url, ALL_TASK_EVENTS)
    task = api.submit()
    with app.app_context():
        db.session.execute(update(Task).where(Task.id == task["id"]).values(max_attempts=1))
        db.session.commit()
        attempts.claim(task["id"])  # a worker took its only attempt... and died
        db.session.execute(
            update(Task).where(Task.id == task["id"]).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
        db.session.commit()
        assert sweep().failed == [task["id"]]
    (payload,) = delivered(app, receiver, secret)
    assert payload["type"] == "task.failed" and "stopped responding" in payload["data"]["error"]


def test_cancelled_tasks_are_delivered_by_the_user_and_by_an_admin(app, api, hooks, receiver):
    _, secret = endpoint_for(app, api, receiver.url, ALL_TASK_EVENTS)
    mine, theirs = api.submit(), api.submit()
    assert api.post(f"/tasks/{mine['id']}/cancel").status_code == 200
    with app.app_context():
        assert admin.apply("cancel", admin.TaskFilter(), theirs["id"]) == 1
    payloads = delivered(app, receiver, secret, 2)
    assert sorted((p["data"]["id"], p["type"], p["data"]["error"]) for p in payloads) == [
        (mine["id"], "task.cancelled", "Cancelled by the user."),
        (theirs["id"], "task.cancelled", "Cancelled by an administrator."),
    ]


def test_a_cancel_that_rolls_back_writes_no_delivery(app, api, hooks, receiver):
    endpoint_for(app, api, receiver.url, ALL_TASK_EVENTS)
    task = api.submit()
    with app.app_context():
        connection = db.engine.connect()
        transaction = connection.begin()
        (row,) = lifecycle.cancel_rows(connection, [Task.id == task["id"]], by="user")
        assert row["status"] == "CANCELLED"
        assert connection.scalar(select(func.count()).select_from(WebhookDelivery)) == 1  # written, in the change
        transaction.rollback()
        connection.close()
    deliver_all(app)
    assert deliveries(app) == [] and receiver.received == []
    assert api.task(task["id"])["status"] == "PENDING"
