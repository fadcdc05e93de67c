"""Budgets: the reservation held at acceptance, its settlement, the race, and the usage they report."""

from __future__ import annotations

import calendar
import json
import threading
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from tests.helpers import api_client, login, make_user
from webapp import budgets
from webapp.errors import BudgetExceededError
from webapp.extensions import db
from webapp.models import User, utcnow
from webapp.services import usage

DEC = Decimal


def user_named(name: str) -> User:
    return db.session.scalar(db.select(User).where(User.username == name))


def months_of(name: str) -> dict:
    user = user_named(name)
    rows = db.session.execute(
        db.text("SELECT month, spent_usd, reserved_usd FROM usage_months WHERE user_id = :u"), {"u": user.id}
    )
    return {month: (spent, held) for month, spent, held in rows}


def set_budget(name: str, text: str) -> User:
    return budgets.set_budget(user_named(name), text)


def test_a_reservation_is_the_dearest_model_of_the_chain(priced_app):
    with priced_app.app_context():
        prompt = "x" * 300  # 100 tokens by the estimate, and 8 for the message's template
        assert budgets.estimate_prompt_tokens(prompt) == 108
        # cheap alone: 108 × 0.15 + 64 × 0.6 (its default max_tokens), per million
        assert budgets.reservation("cheap", prompt, {}) == DEC("0.0000546")
        # chained (1/2) → dear (2.5/10) → cheap: dear is the dearest
        assert budgets.reservation("chained", prompt, {"max_tokens": 100}) == DEC("0.00127")
        assert budgets.reservation("free", prompt, {}) == 0
        # A system prompt counts, and multi-byte text counts by its bytes.
        assert budgets.estimate_prompt_tokens("日本語", system="Be brief.") == 3 + 8 + 3 + 8


def test_reserving_within_the_budget_holds_it_and_past_it_is_refused(priced_app):
    make_user(priced_app, "alice")
    with priced_app.app_context():
        set_budget("alice", "1")
        now = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
        alice = user_named("alice")
        assert budgets.reserve(db.session.connection(), alice, DEC("0.6"), now) == date(2026, 12, 1)
        db.session.commit()
        with pytest.raises(BudgetExceededError) as caught:
            budgets.reserve(db.session.connection(), alice, DEC("0.5"), now)
        db.session.rollback()
        error = caught.value
        assert error.status == 402 and error.code == "budget_exceeded"
        assert error.message == "spent $0.00 of $1.00 this month; the budget resets on 2027-01-01"
        assert error.details == {
            "spent_usd": 0.0,
            "reserved_usd": 0.6,
            "budget_usd": 1.0,
            "needed_usd": 0.5,
            "resets_on": "2027-01-01",
        }
        # What fits exactly is accepted; free work is never refused, even with nothing left.
        assert budgets.reserve(db.session.connection(), alice, DEC("0.4"), now) == date(2026, 12, 1)
        assert budgets.reserve(db.session.connection(), alice, DEC(0), now) is None
        db.session.commit()
        assert months_of("alice") == {date(2026, 12, 1): (DEC(0), DEC(1))}
        # A task larger than the whole budget is refused without touching the row.
        set_budget("alice", "0")
        with pytest.raises(BudgetExceededError, match=r"of \$0.00 this month"):
            budgets.reserve(db.session.connection(), alice, DEC("0.01"), now)


def test_twenty_reservations_at_once_never_pass_the_budget(priced_app):
    """The race: each is its own transaction on its own connection, all released at once."""
    make_user(priced_app, "alice")
    with priced_app.app_context():
        set_budget("alice", "1")
        user_id = user_named("alice").id
        db.session.remove()
    start = threading.Barrier(20)
    outcomes: list[str] = []

    def submit() -> None:
        with priced_app.app_context():
            alice = db.session.get(User, user_id)
            start.wait()
            try:
                budgets.reserve(db.session.connection(), alice, DEC("0.15"))
                db.session.commit()
                outcomes.append("held")
            except BudgetExceededError:
                db.session.rollback()
                outcomes.append("refused")
            finally:
                db.session.remove()

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("held") == 6 and outcomes.count("refused") == 14  # 6 × 0.15 ≤ 1 < 7 × 0.15
    with priced_app.app_context():
        [(spent, held)] = months_of("alice").values()
        assert held == DEC("0.9") and spent == 0


def finished(user_id: int, status: str, reserved: str | None, month: date | None, **answer) -> dict:
    row = dict(
        user_id=user_id, status=status, reserved_usd=reserved and DEC(reserved), reserved_month=month, model="cheap"
    )
    return row | answer


def test_settling_releases_the_reservation_and_books_the_cost_where_it_was_spent(priced_app):
    make_user(priced_app, "alice")
    dec, jan = date(2026, 12, 1), date(2027, 1, 1)
    with priced_app.app_context():
        alice = user_named("alice")
        connection = db.session.connection()
        for amount in ("0.5", "0.25", "0.125"):
            budgets.reserve(connection, alice, DEC(amount), datetime(2026, 12, 31, 23, 0, tzinfo=UTC))
        answered = dict(
            cost_usd=DEC("0.0001234"),
            served_by="cheap",
            prompt_tokens=10,
            completion_tokens=20,
            finished_at=datetime(2027, 1, 1, 0, 5, tzinfo=UTC),
        )
        budgets.settle(
            connection,
            [
                finished(alice.id, "COMPLETED", "0.5", dec, **answered),  # reserved in December, answered in January
                finished(alice.id, "FAILED", "0.25", dec),
                finished(alice.id, "CANCELLED", None, None),  # a free task held nothing
            ],
        )
        db.session.commit()
        assert months_of("alice") == {dec: (DEC(0), DEC("0.125")), jan: (DEC("0.0001234"), DEC(0))}
        january = usage.month_usage(alice, jan)
        assert [row.to_dict() for row in january.by_model] == [
            {"model": "cheap", "tasks": 1, "prompt_tokens": 10, "completion_tokens": 20, "cost_usd": 0.0001234}
        ]
        assert january.spent_usd == sum(row.cost_usd for row in january.by_model)
        assert [d.day for d in january.by_day if d.tasks] == [jan]


# -- GET /api/v1/usage and the /usage page ---------------------------------------------------------


def book(app, name: str, *answers: tuple[str, int, int, str, datetime]) -> None:
    """Record finished answers (model, prompt tokens, completion tokens, cost, when) for a user."""
    with app.app_context():
        user = user_named(name)
        budgets.settle(
            db.session.connection(),
            [
                finished(user.id, "COMPLETED", None, None, served_by=m, prompt_tokens=p, completion_tokens=c)
                | {"cost_usd": DEC(cost), "finished_at": when}
                for m, p, c, cost, when in answers
            ],
        )
        db.session.commit()


def test_the_usage_api_reports_the_month_by_model(app, priced_app):
    api = api_client(app)
    api_client(app, "bob")
    now = utcnow()
    book(
        priced_app,
        "alice",
        ("dear", 100, 50, "0.00075", now),
        ("cheap", 1000, 2000, "0.00135", now),
        ("cheap", 10, 20, "0.0000135", now),
    )
    book(priced_app, "bob", ("dear", 1, 1, "9", now))
    response = api.get(f"/usage?month={now:%Y-%m}")
    assert response.status_code == 200
    body = json.loads(response.get_data(as_text=True), parse_float=DEC)
    assert body["month"] == f"{now:%Y-%m}"
    assert body["spent_usd"] == DEC("0.0021135") and body["reserved_usd"] == 0 and body["budget_usd"] is None
    assert body["by_model"] == [
        {"model": "cheap", "tasks": 2, "prompt_tokens": 1010, "completion_tokens": 2020, "cost_usd": DEC("0.0013635")},
        {"model": "dear", "tasks": 1, "prompt_tokens": 100, "completion_tokens": 50, "cost_usd": DEC("0.00075")},
    ]
    assert sum(row["cost_usd"] for row in body["by_model"]) == body["spent_usd"]
    assert api.get("/usage").get_json()["spent_usd"] == float(body["spent_usd"])  # this month by default
    empty = api.get("/usage?month=1999-01").get_json()
    assert empty == {
        "month": "1999-01",
        "spent_usd": 0,
        "reserved_usd": 0,
        "budget_usd": None,
        "by_model": [],
        "by_day": empty["by_day"],
    }
    assert len(empty["by_day"]) == 31


@pytest.mark.parametrize("month", ["2026-13", "2026-00", "26-12", "2026-1", "december", "2026-12-01", "", "0000-01"])
def test_a_month_that_is_not_yyyy_mm_is_422(app, month):
    api = api_client(app)
    response = api.get("/usage", query_string={"month": month})
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["code"] == "validation_error" and "YYYY-MM" in error["message"]


def test_the_usage_page_draws_the_month_and_its_models(app, priced_app, client):
    make_user(app, "alice")
    now = utcnow()
    book(priced_app, "alice", ("dear", 100, 50, "0.75", now), ("cheap", 10, 20, "0.25", now))
    with priced_app.app_context():
        set_budget("alice", "10")
    login(client)
    page = client.get("/usage").get_data(as_text=True)
    assert 'aria-current="page">Usage</a>' in page
    assert (
        '<dd id="spent">$1.00</dd>' in page
        and '<dd id="budget">$10.00</dd>' in page
        and '<dd id="left">$9.00</dd>' in page
    )
    assert page.count("<rect ") == calendar.monthrange(now.year, now.month)[1]  # a bar per day
    assert f'data-day="{now:%Y-%m-%d}"' in page and "$1.00, 2 answers" in page
    assert "<td>dear</td>" in page and "<td>cheap</td>" in page
    bad = client.get("/usage?month=soon")
    assert bad.status_code == 200 and "is not a month" in bad.get_data(as_text=True)


def test_admins_see_spend_by_user(app, priced_app, client):
    make_user(app, "root", admin=True)
    make_user(app, "alice")
    book(priced_app, "alice", ("dear", 100, 50, "2.5", utcnow()))
    login(client, "root")
    page = client.get("/admin/stats").get_data(as_text=True)
    assert 'id="spend-by-user"' in page and "<td>alice</td>" in page and "$2.50" in page
