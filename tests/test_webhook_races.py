"""A delivery job and the commit it was woken by, in the order that lost an event once.

The job is enqueued as the change's transaction commits (`outbox.enqueue_at_commit`, on the
connection's commit event, which runs just before the database's COMMIT), so a fast worker may
look for the row a moment too early. bench/webhook_latency.py found 1 or 2 deliveries in 200 left
pending that way: the claim ran before the COMMIT, the look that tells "not there yet" from
"not claimable" just after it. Here the test's transaction commits exactly between the two.
"""

from __future__ import annotations

from sqlalchemy import event, select

from jobs.deliver import deliver
from webapp import lifecycle
from webapp.extensions import db
from webapp.models import Task
from webapp.webhook_models import WebhookDelivery


def test_a_row_committed_between_the_claim_and_the_look_is_still_sent(app, api, hooks, receiver):
    secret = api.post("/webhooks", json={"url": receiver.url, "events": ["task.cancelled"]}).get_json()["secret"]
    task = api.submit()
    with app.app_context():
        connection = db.engine.connect()
        transaction = connection.begin()
        lifecycle.cancel_rows(connection, [Task.id == task["id"]], by="user")  # writes the delivery, uncommitted
        delivery_id = connection.scalar(select(WebhookDelivery.id))

        def commit_now(conn, cursor, statement, *args):
            # The job's look for the row (a count): the change commits right before it.
            if conn is not connection and "count(" in statement and transaction.is_active:
                transaction.commit()

        event.listen(db.engine, "before_cursor_execute", commit_now)
        try:
            result = deliver(delivery_id)
        finally:
            event.remove(db.engine, "before_cursor_execute", commit_now)
            if transaction.is_active:
                transaction.rollback()
            connection.close()
            db.session.remove()
    assert result == "delivered"
    assert receiver.wait_for(1)[0].verify(secret)["data"]["id"] == task["id"]
