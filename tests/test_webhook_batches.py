"""batch.* webhook events: each ending of a batch is delivered, signed, with the batch as the API shows it.

The deliveries are written in the transaction of the batch's final status change
(`webapp/lifecycle/batches.py`, through `hooks._batch_ended`); a real receiver on loopback
verifies them with the `standardwebhooks` package, as a user's would.
"""

from __future__ import annotations

import io
import json
from datetime import timedelta

from sqlalchemy import func, select, update

from jobs.batches import intake
from tests.helpers import work
from tests.receiver import deliver_all
from webapp.batch_models import Batch
from webapp.extensions import db
from webapp.lifecycle import batches as lifecycle
from webapp.models import utcnow
from webapp.services import batches as service
from webapp.webhook_models import WebhookDelivery

BATCH_EVENTS = ("batch.completed", "batch.failed", "batch.cancelled", "batch.expired")


def line(custom_id: str) -> bytes:
    body = {"model": "fake", "messages": [{"role": "user", "content": f"Line {custom_id}"}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}).encode()


def new_batch(api, content: bytes = line("1") + b"\n" + line("2") + b"\n") -> str:
    uploaded = api.post("/files", data={"file": (io.BytesIO(content), "in.jsonl"), "purpose": "batch"})
    assert uploaded.status_code == 200, uploaded.get_json()
    body = {"input_file_id": uploaded.get_json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    created = api.post("/batches", json=body)
    assert created.status_code == 200, created.get_json()
    return created.get_json()["id"]


def subscribe(api, url: str, events=BATCH_EVENTS) -> str:
    response = api.post("/webhooks", json={"url": url, "events": list(events)})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["secret"]


def delivered(app, receiver, secret: str, count: int = 1) -> list[dict]:
    deliver_all(app)
    return [got.verify(secret) for got in receiver.wait_for(count)]


def delivery_count(app) -> int:
    with app.app_context():
        count = db.session.scalar(select(func.count()).select_from(WebhookDelivery))
        db.session.remove()
        return count


def test_a_completed_batch_is_delivered_with_the_batch_object(app, api, hooks, receiver):
    secret = subscribe(api, receiver.url)
    batch_id = new_batch(api)
    work(app)  # the intake, then its lines
    api.get(f"/batches/{batch_id}")  # a read nudges it on
    work(app)
    shown = api.get(f"/batches/{batch_id}").get_json()
    assert shown["status"] == "completed"
    (payload,) = delivered(app, receiver, secret)
    assert payload["type"] == "batch.completed" and payload["timestamp"].endswith("Z")
    assert payload["data"] == shown
    assert payload["data"]["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    assert receiver.received[0].headers["webhook-id"].startswith("msg_")


def test_a_batch_whose_file_fails_validation_is_delivered(app, api, hooks, receiver):
    secret = subscribe(api, receiver.url)
    batch_id = new_batch(api, line("1") + b'\n{"method": "POST"}\n')  # line 2 has no custom_id
    work(app)
    shown = api.get(f"/batches/{batch_id}").get_json()
    assert shown["status"] == "failed"
    (payload,) = delivered(app, receiver, secret)
    assert payload["type"] == "batch.failed" and payload["data"] == shown
    assert payload["data"]["errors"]["data"][0]["code"] == "missing_custom_id"


def test_a_cancelled_batch_is_delivered(app, api, hooks, receiver):
    secret = subscribe(api, receiver.url)
    batch_id = new_batch(api)
    assert api.post(f"/batches/{batch_id}/cancel").status_code == 200
    work(app)  # the intake finds it cancelled and does nothing
    shown = api.get(f"/batches/{batch_id}").get_json()
    assert shown["status"] == "cancelled"
    (payload,) = delivered(app, receiver, secret)
    assert payload["type"] == "batch.cancelled" and payload["data"] == shown


def test_a_batch_whose_window_ran_out_is_delivered_by_the_scheduler_pass(app, api, hooks, receiver):
    secret = subscribe(api, receiver.url)
    batch_id = new_batch(api)
    with app.app_context():
        assert intake(batch_id) == "in_progress"  # its tasks are queued; no worker runs them
        db.session.execute(update(Batch).where(Batch.id == batch_id).values(expires_at=utcnow() - timedelta(seconds=1)))
        db.session.commit()
        assert service.sweep() == 1  # what the scheduler runs every SWEEP_INTERVAL
        db.session.remove()
    shown = api.get(f"/batches/{batch_id}").get_json()
    assert shown["status"] == "expired"
    (payload,) = delivered(app, receiver, secret)
    assert payload["type"] == "batch.expired" and payload["data"] == shown
    assert payload["data"]["request_counts"] == {"total": 2, "completed": 0, "failed": 2}


def test_an_ending_that_rolls_back_sends_nothing(app, api, hooks, receiver):
    subscribe(api, receiver.url)
    batch_id = new_batch(api)
    with app.app_context(), db.engine.connect() as connection:  # closed, so rolled back, even when an assert fails
        connection.begin()
        assert lifecycle.fail_validation(connection, batch_id, [{"code": "x", "message": "x", "line": 1}])
        assert connection.scalar(select(func.count()).select_from(WebhookDelivery)) == 1  # written, in the change
        connection.rollback()
    deliver_all(app)
    assert delivery_count(app) == 0 and receiver.received == []
    assert api.get(f"/batches/{batch_id}").get_json()["status"] == "validating"


def test_task_subscribers_and_other_users_hear_no_batch_event(app, api, other_api, hooks, receiver):
    secret = subscribe(api, receiver.url, events=("task.completed",))
    subscribe(other_api, receiver.url)  # bob hears of bob's batches only
    batch_id = new_batch(api)
    work(app)
    api.get(f"/batches/{batch_id}")
    work(app)
    assert api.get(f"/batches/{batch_id}").get_json()["status"] == "completed"
    payloads = delivered(app, receiver, secret, 2)
    assert sorted(p["type"] for p in payloads) == ["task.completed", "task.completed"]
    assert {p["data"]["batch_id"] for p in payloads} == {batch_id}
    assert delivery_count(app) == 2 and len(receiver.received) == 2
