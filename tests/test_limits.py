"""A model's concurrency: tasks over it wait in the model's line and get freed slots in order."""

from __future__ import annotations

import time

import pytest
from rq import Queue
from rq.serializers import JSONSerializer

from jobs.limits import line_place, model_limits
from jobs.run_task import wake
from jobs.sweeper import sweep
from tests.helpers import age, redis_conn, task_row, work
from webapp.catalog import catalog


@pytest.fixture()
def one_slot(app):
    """A model of the catalog with one call at a time, under a name of its own."""
    with app.app_context():
        return catalog().get("fake-narrow").model_copy(update={"name": "one-slot", "concurrency": 1})


def test_freed_slots_go_to_the_line_in_order_of_priority_then_submission(app, one_slot):
    with app.app_context():
        line = model_limits()
        verdict, running = line.acquire(one_slot, "job-1", 10, 1, line_place(5, 1))
        assert verdict.allowed
        for task_id, priority in ((2, 5), (3, 5), (4, 9)):  # 4 is submitted last, with high priority
            verdict, hold = line.acquire(one_slot, f"job-{task_id}", 10, task_id, line_place(priority, task_id))
            assert (verdict.allowed, verdict.limit, verdict.wait, hold) == (False, "concurrency", 0.0, None)
        assert line.waiting(["one-slot"]) == {2, 3, 4}

        assert line.release(running) == (4,)  # the slot is reserved for the head of the line
        assert not line.acquire(one_slot, "job-5", 10, 5, line_place(10, 5))[0].allowed  # a newcomer waits
        assert not line.acquire(one_slot, "job-2", 10, 2, line_place(5, 2))[0].allowed  # so does the next
        verdict, hold = line.acquire(one_slot, "job-4b", 10, 4, line_place(9, 4))  # 4's new job takes it
        assert verdict.allowed and line.in_flight("one-slot") == 1

        # 5 came later but with priority 10: it is next, then 2 and 3 in submission order.
        assert line.release(hold) == (5,)
        assert line.unreserve("one-slot", 1, 5) == (2,)  # 5 was cancelled meanwhile: 2 gets its turn
        assert line.waiting(["one-slot"]) == {3}


def test_a_dead_workers_slots_expire_into_the_line(app, one_slot):
    with app.app_context():
        line = model_limits()
        lease, line.lease_seconds = line.lease_seconds, 0.3  # the dead worker's hold is never renewed
        try:
            line.acquire(one_slot, "job-dead", 10, 1, line_place(5, 1))
            assert not line.acquire(one_slot, "job-2", 10, 2, line_place(5, 2))[0].allowed
            time.sleep(0.4)
            assert line.pump(one_slot) == (2,)
        finally:
            line.lease_seconds = lease  # the app's limits outlive the test: the next ones get real leases


def test_tasks_over_the_concurrency_wait_in_line_then_run_in_turn(app, api, fake_provider):
    """Waiting costs no attempt and no timer; a cancelled task's turn passes to the next."""
    with app.app_context():
        spec = catalog().get("fake-narrow")
        busy = [model_limits().acquire(spec, f"elsewhere-{i}", 10, 9000 + i)[1] for i in range(spec.concurrency)]
    first, second, third = (api.submit(f"in line {i}", model="fake-narrow") for i in range(3))
    work(app, scheduled=False)  # every job finds the model busy: its task joins the line, its job ends
    queue = Queue("default", connection=redis_conn(), serializer=JSONSerializer)
    assert queue.get_job_ids() == [] and queue.scheduled_job_registry.get_job_ids() == []
    for task in (first, second, third):
        row = task_row(app, task["id"])
        assert (row.status, row.attempts) == ("PENDING", 0)
    with app.app_context():
        assert model_limits().waiting(["fake-narrow"]) == {first["id"], second["id"], third["id"]}
        # Left alone by the sweeper however long they wait: the line holds them.
        for task in (first, second, third):
            age(app, task["id"], 600)
        assert sweep().requeued == []

    assert api.post(f"/tasks/{first['id']}/cancel").status_code == 200
    with app.app_context():
        wake(spec, model_limits().release(busy[0]))  # the slot passes over the cancelled task
    assert queue.get_job_ids() == [task_row(app, second["id"]).job_id]
    work(app, scheduled=False)
    assert api.task(second["id"])["status"] == "COMPLETED"
    # Its slot went to the third when its call ended.
    assert api.task(third["id"])["status"] == "COMPLETED"
    assert api.task(first["id"])["status"] == "CANCELLED"
    assert fake_provider.calls_for("in line 0") == []
    with app.app_context():
        for hold in busy[1:]:
            model_limits().release(hold)
        assert model_limits().waiting(["fake-narrow"]) == set() and model_limits().in_flight("fake-narrow") == 0


def test_the_line_is_round_robin_across_owners_within_a_priority(app, one_slot):
    with app.app_context():
        line = model_limits()
        running = line.acquire(one_slot, "job-1", 10, 1, line_place(5, 1), owner=1)[1]
        for task_id in (2, 3, 4):  # owner 1's backlog
            assert not line.acquire(one_slot, f"job-{task_id}", 10, task_id, line_place(5, task_id), owner=1)[0].allowed
        assert not line.acquire(one_slot, "job-5", 10, 5, line_place(5, 5), owner=2)[0].allowed  # owner 2, later
        assert not line.acquire(one_slot, "job-6", 10, 6, line_place(9, 6), owner=1)[0].allowed  # a higher priority
        order, hold = [], running
        while True:
            woken = line.release(hold)
            if not woken:
                break
            order.extend(woken)
            hold = line.acquire(one_slot, f"job-{woken[0]}b", 10, woken[0], line_place(5, woken[0]), owner=1)[1]
        # Priority first; then owner 2's task right after owner 1's first, not after all three.
        assert order == [6, 2, 5, 3, 4]
        assert line.connection.exists("atr:limit:one-slot:turns") == 0  # an empty line starts its turns again
