"""Monthly budgets: hold a task's most it can cost when it is accepted, settle it when it ends.

One row per user and month (`usage_months`) carries both what was spent and what unfinished
tasks hold. Acceptance adds a task's reservation to it with one conditional upsert, in the
transaction that inserts the task: the row lock serialises a user's concurrent submissions, so
the reservations of accepted tasks never add up past the budget. When a task ends (completed,
failed, cancelled, taken back for good, deleted) the same transaction that ends it subtracts
its reservation and adds its actual cost (`settle`), so nothing is ever left held. The 402, the
/usage page and GET /api/v1/usage all read that one row.

A reservation is the dearest model of the task's fallback chain, at the prompt's estimated
tokens plus its max_tokens. A task whose chain is free holds nothing and is never refused.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from decimal import Decimal

from flask import current_app
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from . import money
from .catalog import catalog
from .errors import BudgetExceededError, ValidationError
from .extensions import db
from .models import UNFINISHED, Task, TaskStatus, UsageDay, UsageMonth, User, utcnow
from .tokens import MESSAGE_OVERHEAD_TOKENS, answer_tokens, estimate_prompt_tokens, fits  # noqa: F401 (callers use them here)

_months = UsageMonth.__table__
_days = UsageDay.__table__


def default_budget() -> Decimal | None:
    return current_app.config["DEFAULT_MONTHLY_BUDGET_USD"]


def budget_of(user: User) -> Decimal | None:
    """Return the user's monthly budget in dollars, or None for no limit."""
    return user.budget(default_budget())


def reservation(model: str, prompt: str, params: dict) -> Decimal:
    """Return the most a task can cost: the dearest model of its chain, at its estimated tokens."""
    prompt_tokens = estimate_prompt_tokens(prompt, params.get("system"))
    costs = [spec.cost(prompt_tokens, answer_tokens(spec, params)) for spec in catalog().chain(model)]
    return max(costs, default=money.ZERO)


def _insert(table):
    return (pg_insert if db.engine.dialect.name == "postgresql" else sqlite_insert)(table)


def reserve(connection, user: User, amount: Decimal, now: datetime | None = None) -> date | None:
    """Hold `amount` of the user's month in the caller's transaction; return the month, or None if free.

    Raises BudgetExceededError when spend plus held reservations plus `amount` would pass the
    budget. One statement: the upsert's WHERE runs under the row's lock.
    """
    if amount <= 0:
        return None
    month = money.month_of(now or utcnow())
    budget = budget_of(user)
    if budget is not None and amount > budget:
        raise refusal(connection, user, month, budget, amount)
    statement = _insert(_months).values(user_id=user.id, month=month, spent_usd=money.ZERO, reserved_usd=amount)
    held = _months.c.reserved_usd + statement.excluded.reserved_usd
    statement = statement.on_conflict_do_update(
        index_elements=[_months.c.user_id, _months.c.month],
        set_={"reserved_usd": held},
        where=None if budget is None else _months.c.spent_usd + held <= budget,
    ).returning(_months.c.month)
    if connection.execute(statement).first() is None:
        raise refusal(connection, user, month, budget, amount)
    return month


def hold(connection, user: User, values: dict) -> None:
    """Reserve a task being accepted in its transaction; note it in the row's `values` before the insert.

    Raises BudgetExceededError when it does not fit: the caller rolls back, nothing is written.
    """
    amount = reservation(values["model"], values["prompt"], values["params"] or {})
    month = reserve(connection, user, amount)
    values["reserved_usd"], values["reserved_month"] = (amount, month) if month else (None, None)


def hold_again(connection, rows: Iterable[Mapping]) -> None:
    """Reserve finished tasks that are being run again (a retry is accepted work too).

    `rows` are the reopened tasks' rows; their new reservation replaces the old on the row (the
    old one was settled when they ended). Raises BudgetExceededError when one does not fit.
    """
    for row in rows:
        user = db.session.get(User, row["user_id"])
        amount = reservation(row["model"], row["prompt"], row["params"] or {})
        month = reserve(connection, user, amount)
        connection.execute(
            update(Task)
            .where(Task.id == row["id"])
            .values(reserved_usd=amount if month else None, reserved_month=month)
        )


def hold_lines(connection, user: User, rows: list[dict]) -> tuple[list[dict], list[dict], str]:
    """Hold a batch's new task rows in the intake's transaction; return (kept, refused, why refused).

    Lines are held in file order while they fit; the ones past the budget are refused (they go
    to the batch's error file) and the others run. The month's row is locked for the rest of the
    intake's transaction, so a submission meanwhile waits for it and then sees what it holds.
    Each kept row gets its reserved_usd and reserved_month.
    """
    month = money.month_of(utcnow())
    budget = budget_of(user)
    amounts = [reservation(row["model"], row["prompt"], row["params"] or {}) for row in rows]
    start = _insert(_months).values(user_id=user.id, month=month, spent_usd=money.ZERO, reserved_usd=money.ZERO)
    connection.execute(start.on_conflict_do_nothing(index_elements=[_months.c.user_id, _months.c.month]))
    spent, held = connection.execute(
        select(_months.c.spent_usd, _months.c.reserved_usd)
        .where(_months.c.user_id == user.id, _months.c.month == month)
        .with_for_update()
    ).one()
    left = None if budget is None else Decimal(budget) - Decimal(spent) - Decimal(held)
    kept, refused, total = [], [], money.ZERO
    for row, amount in zip(rows, amounts, strict=True):
        if left is not None and amount > 0 and amount > left:
            refused.append(row)
            continue
        if left is not None:
            left -= amount
        total += amount
        row["reserved_usd"], row["reserved_month"] = (amount, month) if amount > 0 else (None, None)
        kept.append(row)
    if total:
        connection.execute(
            update(_months)
            .where(_months.c.user_id == user.id, _months.c.month == month)
            .values(reserved_usd=_months.c.reserved_usd + total)
        )
    why = refusal(connection, user, month, budget, max(amounts)).message if refused else ""
    return kept, refused, why


def release_unfinished(connection, rows: Iterable[Mapping]) -> None:
    """Release what deleted tasks held: only the unfinished ones still hold anything."""
    settle(connection, [row for row in rows if row["status"] in UNFINISHED])


def refusal(connection, user: User, month: date, budget: Decimal, amount: Decimal) -> BudgetExceededError:
    """Return the 402 for a task that does not fit: what was spent, of what, and when it resets."""
    row = connection.execute(
        select(_months.c.spent_usd, _months.c.reserved_usd).where(
            _months.c.user_id == user.id, _months.c.month == month
        )
    ).first()
    spent, held = (row.spent_usd, row.reserved_usd) if row else (money.ZERO, money.ZERO)
    resets = money.next_month(month)
    return BudgetExceededError(
        f"spent {money.usd(spent)} of {money.usd(budget)} this month; the budget resets on {resets.isoformat()}",
        {
            "spent_usd": money.as_json(spent),
            "reserved_usd": money.as_json(held),
            "budget_usd": money.as_json(budget),
            "needed_usd": money.as_json(amount),
            "resets_on": resets.isoformat(),
        },
    )


def settle(connection, rows: Iterable[Mapping]) -> None:
    """Release the reservations of tasks that just ended and book the cost of those that answered.

    Call it in the transaction that ended them, once per ending (the status change's fence
    makes that so). Each row needs user_id, status, reserved_usd, reserved_month, and for a
    COMPLETED one cost_usd, served_by (or model), prompt_tokens, completion_tokens, finished_at.
    """
    months: dict[tuple[int, date], list[Decimal]] = defaultdict(lambda: [money.ZERO, money.ZERO])
    days: dict[tuple[int, date, str], list] = defaultdict(lambda: [0, 0, 0, money.ZERO])
    for row in rows:
        if row["reserved_usd"] and row["reserved_month"] is not None:
            months[(row["user_id"], row["reserved_month"])][1] -= Decimal(row["reserved_usd"])
        if row["status"] != TaskStatus.COMPLETED.value:
            continue
        finished = row.get("finished_at") or utcnow()
        cost = Decimal(row.get("cost_usd") or 0)
        if cost:
            months[(row["user_id"], money.month_of(finished))][0] += cost
        day = days[(row["user_id"], money.day_of(finished), row.get("served_by") or row["model"])]
        day[0] += 1
        day[1] += row.get("prompt_tokens") or 0
        day[2] += row.get("completion_tokens") or 0
        day[3] += cost
    month_rows = [
        {"user_id": user, "month": month, "spent_usd": spent, "reserved_usd": held}
        for (user, month), (spent, held) in months.items()
        if spent or held
    ]
    if month_rows:
        statement = _insert(_months)
        connection.execute(
            statement.on_conflict_do_update(
                index_elements=[_months.c.user_id, _months.c.month],
                set_={
                    "spent_usd": _months.c.spent_usd + statement.excluded.spent_usd,
                    "reserved_usd": _months.c.reserved_usd + statement.excluded.reserved_usd,
                },
            ),
            month_rows,
        )
    if days:
        statement = _insert(_days)
        connection.execute(
            statement.on_conflict_do_update(
                index_elements=[_days.c.user_id, _days.c.day, _days.c.model],
                set_={
                    name: _days.c[name] + statement.excluded[name]
                    for name in ("tasks", "prompt_tokens", "completion_tokens", "cost_usd")
                },
            ),
            [
                dict(user_id=user, day=day, model=model, tasks=n, prompt_tokens=p, completion_tokens=c, cost_usd=cost)
                for (user, day, model), (n, p, c, cost) in days.items()
            ],
        )


def set_budget(user: User, text: str) -> User:
    """Set a user's monthly budget from what an admin typed: dollars, "none" (no limit) or "default"."""
    word = (text or "").strip().lower()
    if word in ("", "default"):
        user.budget_is_default, user.monthly_budget_usd = True, None
    elif word in ("none", "unlimited"):
        user.budget_is_default, user.monthly_budget_usd = False, None
    else:
        try:
            amount = money.parse_budget(text)
        except ValueError as exc:
            raise ValidationError(str(exc), {"budget": str(exc)}) from None
        user.budget_is_default, user.monthly_budget_usd = False, amount
    db.session.commit()
    return user


def _describe(amount: Decimal | None) -> str:
    return "no limit" if amount is None else f"{money.usd(amount)} a month"


def describe_default() -> str:
    return _describe(default_budget())


def describe_budget(user: User) -> str:
    """Say what a user's budget is, for people: "$25.00 a month", "no limit", "the default (…)"."""
    if user.budget_is_default:
        return f"the default ({describe_default()})"
    return _describe(user.monthly_budget_usd)
