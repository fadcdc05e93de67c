"""Budgets end to end: what submitting holds, what ending a task settles, and the 402 everywhere.

Through the product's own paths: the API, the form, retries, the worker, the sweeper. After every
step `ledger` checks the invariant that what the months hold equals what unfinished tasks hold,
so a reservation is never left behind nor released twice.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from decimal import Decimal

from jobs.sweeper import sweep
from tests.helpers import api_client, csrf_from, login, work
from tests.priced import ledger
from webapp import budgets, money
from webapp.extensions import db
from webapp.lifecycle import attempts
from webapp.models import Task, User, utcnow
from webapp.services import accounts

DEC = Decimal
# 12 characters: 4 tokens by the estimate, 8 for the message template; dear's 1000 answer tokens
# at $10 a million and 12 prompt tokens at $2.50: $0.01003 held per task.
PROMPT = "twelve chars"
DEAR = {"model": "dear", "params": {"max_tokens": 1000}}
HELD = DEC("0.01003")


def with_budget(app, name: str, amount: str) -> tuple:
    api = api_client(app, name)
    with app.app_context():
        budgets.set_budget(accounts.find_user(name), amount)
        user_id = accounts.find_user(name).id
        db.session.remove()
    return api, user_id


def held_now(app, user_id: int) -> tuple[Decimal, Decimal]:
    """(spent, reserved) of this month."""
    return ledger(app, user_id).get(money.month_of(utcnow()), (DEC(0), DEC(0)))


def task_of(app, task_id: int) -> Task:
    with app.app_context():
        row = db.session.get(Task, task_id)
        db.session.expunge(row)
        db.session.remove()
        return row


def test_submitting_holds_the_dearest_model_and_completing_books_the_cost(priced_app):
    api, user_id = with_budget(priced_app, "alice", "1")
    with priced_app.app_context():
        assert budgets.reservation("dear", PROMPT, {"max_tokens": 1000}) == HELD
        chained = budgets.reservation("chained", PROMPT, {"max_tokens": 1000})
    task = api.submit(PROMPT, **DEAR)
    assert task_of(priced_app, task["id"]).reserved_usd == HELD
    assert held_now(priced_app, user_id) == (0, HELD)
    # chained (1/2) falls back to dear (2.5/10): it holds dear's price.
    other = api.submit(PROMPT, model="chained", params={"max_tokens": 1000})
    assert held_now(priced_app, user_id) == (0, HELD + chained) and chained == HELD
    work(priced_app)
    done, second = api.task(task["id"]), api.task(other["id"])
    assert done["status"] == second["status"] == "COMPLETED"
    cost = (DEC(done["usage"]["prompt_tokens"]) * DEC("2.5") + DEC(done["usage"]["completion_tokens"]) * 10) / 10**6
    chained_cost = (DEC(second["usage"]["prompt_tokens"]) + DEC(second["usage"]["completion_tokens"]) * 2) / 10**6
    assert DEC(str(done["cost_usd"])) == cost and DEC(str(second["cost_usd"])) == chained_cost
    assert held_now(priced_app, user_id) == (cost + chained_cost, 0)
    usage = api.get("/usage").get_json()
    assert {row["model"]: row["tasks"] for row in usage["by_model"]} == {"dear": 1, "chained": 1}
    # The task page and History show what it cost.
    client = priced_app.test_client()
    login(client)
    assert f'{money.usd(cost)} <span class="meta">at dear\'s prices' in client.get(f"/tasks/{task['id']}").get_data(
        as_text=True
    )
    assert money.usd(cost) in client.get("/tasks").get_data(as_text=True)


def test_a_fallback_is_priced_at_the_model_that_answered(priced_app, fake_provider):
    api, user_id = with_budget(priced_app, "alice", "1")
    fake_provider.script(PROMPT, *[{"status": 500}] * 3)  # chained's share of attempts
    task = api.submit(PROMPT, model="chained", params={"max_tokens": 1000})
    work(priced_app)
    done = api.task(task["id"])
    assert done["status"] == "COMPLETED" and done["served_by"] == "dear"
    cost = (DEC(done["usage"]["prompt_tokens"]) * DEC("2.5") + DEC(done["usage"]["completion_tokens"]) * 10) / 10**6
    assert DEC(str(done["cost_usd"])) == cost
    assert held_now(priced_app, user_id) == (cost, 0)


def test_failure_cancel_and_delete_release_the_hold(priced_app, fake_provider):
    api, user_id = with_budget(priced_app, "alice", "1")
    fake_provider.script("refused " + PROMPT, {"status": 400, "message": "unsupported parameter"})
    failed = api.submit("refused " + PROMPT, **DEAR)
    cancelled = api.submit(PROMPT, **DEAR)
    deleted = api.submit(PROMPT + "!", **DEAR)
    assert held_now(priced_app, user_id)[1] > 0
    assert api.post(f"/tasks/{cancelled['id']}/cancel").status_code == 200
    assert api.delete(f"/tasks/{deleted['id']}").status_code == 204
    work(priced_app)
    assert api.task(failed["id"])["status"] == "FAILED"
    assert held_now(priced_app, user_id) == (0, 0)
    # Deleting a finished task gives nothing back twice.
    assert api.delete(f"/tasks/{failed['id']}").status_code == 204
    assert held_now(priced_app, user_id) == (0, 0)


def test_a_dead_workers_task_keeps_its_hold_until_it_ends_once(priced_app):
    api, user_id = with_budget(priced_app, "alice", "1")
    task = api.submit(PROMPT, **DEAR)
    past = utcnow() - timedelta(seconds=1)
    with priced_app.app_context():
        assert attempts.claim(task["id"]) is not None  # a worker took it... and died
        db.session.query(Task).filter_by(id=task["id"]).update({"lease_expires_at": past})
        db.session.commit()
        assert sweep().reclaimed == [task["id"]]
    assert task_of(priced_app, task["id"]).status == "PENDING"
    assert held_now(priced_app, user_id) == (0, HELD)  # still the task's: it runs again
    with priced_app.app_context():
        assert attempts.claim(task["id"]) is not None
        db.session.query(Task).filter_by(id=task["id"]).update(
            {"lease_expires_at": past, "attempts": Task.max_attempts}
        )
        db.session.commit()
        sweep()
        sweep()  # a second pass finds nothing more to end
    assert task_of(priced_app, task["id"]).status == "FAILED"
    assert held_now(priced_app, user_id) == (0, 0)


def test_over_budget_is_402_with_spent_budget_and_reset_date(priced_app):
    api, user_id = with_budget(priced_app, "alice", "0.015")
    first = api.submit(PROMPT, **DEAR)
    response = api.post("/tasks", json={"prompt": PROMPT, **DEAR})
    assert response.status_code == 402
    error = response.get_json()["error"]
    resets = money.next_month(money.month_of(utcnow())).isoformat()
    assert error["code"] == "budget_exceeded"
    assert error["message"] == f"spent $0.00 of $0.015 this month; the budget resets on {resets}"
    assert error["details"]["reserved_usd"] == float(HELD) and error["details"]["needed_usd"] == float(HELD)
    # Nothing half-written: no task, no hold for the refused one.
    with priced_app.app_context():
        assert db.session.query(Task).count() == 1
        db.session.remove()
    assert held_now(priced_app, user_id) == (0, HELD)
    # Free work is never refused; once the first one is done, its unused hold is back.
    api.submit(PROMPT, model="free")
    work(priced_app)
    spent, held = held_now(priced_app, user_id)
    assert held == 0 and spent == DEC(str(api.task(first["id"])["cost_usd"]))
    api.submit(PROMPT, **DEAR)


def test_a_retry_is_accepted_work_too(priced_app, fake_provider):
    api, user_id = with_budget(priced_app, "alice", "0.015")
    fake_provider.script("refused " + PROMPT, {"status": 400, "message": "unsupported parameter"})
    failed = api.submit("refused " + PROMPT, **DEAR)
    work(priced_app)
    api.submit(PROMPT, **DEAR)  # holds what is left
    response = api.post(f"/tasks/{failed['id']}/retry")
    assert response.status_code == 402 and response.get_json()["error"]["code"] == "budget_exceeded"
    assert task_of(priced_app, failed["id"]).status == "FAILED"
    assert held_now(priced_app, user_id) == (0, HELD)


def test_the_form_says_the_same_words_beside_the_button(priced_app):
    _, _ = with_budget(priced_app, "alice", "0")
    client = priced_app.test_client()
    login(client)
    token = csrf_from(client.get("/").get_data(as_text=True))
    form = {"prompt": PROMPT, "model": "dear", "max_tokens": "1000", "csrf_token": token}
    response = client.post("/tasks", data=form)
    assert response.status_code == 402
    html = response.get_data(as_text=True)
    resets = money.next_month(money.month_of(utcnow())).isoformat()
    beside = html.split('id="budget-error"', 1)[1].split("</p>", 1)[0]
    assert f"spent $0.00 of $0.00 this month; the budget resets on {resets}" in beside
    assert 'aria-describedby="budget-error"' in html and PROMPT in html  # what was typed is kept


def test_twenty_submissions_at_once_cannot_spend_past_the_budget(priced_app):
    api, user_id = with_budget(priced_app, "alice", "0.05")  # 4 × 0.01003 fit, 5 do not
    start = threading.Barrier(20)
    statuses: list[int] = []

    def submit() -> None:
        client = priced_app.test_client()
        start.wait()
        response = client.post("/api/v1/tasks", json={"prompt": PROMPT, **DEAR}, headers=api.headers)
        statuses.append(response.status_code)

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [202] * 4 + [402] * 16
    assert held_now(priced_app, user_id) == (0, 4 * HELD)
    work(priced_app)
    spent, held = held_now(priced_app, user_id)
    with priced_app.app_context():
        costs = [task.cost_usd for task in db.session.query(Task).filter_by(user_id=user_id)]
        budget = db.session.get(User, user_id).monthly_budget_usd
        db.session.remove()
    assert held == 0 and spent == sum(costs) and spent <= budget


def test_a_batchs_lines_past_the_budget_go_to_its_error_file_and_the_rest_run(priced_app):
    import io
    import json

    api, user_id = with_budget(priced_app, "alice", "0.025")  # two lines fit, the third does not
    body = {"model": "dear", "max_tokens": 1000, "messages": [{"role": "user", "content": PROMPT}]}
    content = b"".join(
        json.dumps({"custom_id": f"line-{n}", "method": "POST", "url": "/v1/chat/completions", "body": body}).encode()
        + b"\n"
        for n in range(3)
    )
    upload = api.post("/files", data={"file": (io.BytesIO(content), "in.jsonl"), "purpose": "batch"})
    batch = api.post(
        "/batches",
        json={"input_file_id": upload.get_json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    ).get_json()
    work(priced_app)  # the intake (two lines held, the third refused), then the two tasks
    api.get(f"/batches/{batch['id']}")
    work(priced_app)
    done = api.get(f"/batches/{batch['id']}").get_json()
    assert done["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    errors = [json.loads(row) for row in api.get(f"/files/{done['error_file_id']}/content").data.splitlines()]
    resets = money.next_month(money.month_of(utcnow())).isoformat()
    assert [(row["custom_id"], row["error"]["code"]) for row in errors] == [("line-2", "budget_exceeded")]
    assert errors[0]["error"]["message"] == (f"spent $0.00 of $0.025 this month; the budget resets on {resets}")
    spent, held = held_now(priced_app, user_id)
    assert held == 0 and 0 < spent <= DEC("0.025")
