"""What a month cost: a user's spend, held reservations and budget, by model and by day.

Read from the ledgers that budgets are enforced from (webapp/budgets.py): the month's
row gives spent and reserved, its days give the breakdown, and both are written in the same
transactions, so the figures always add up. They outlive the tasks (retention deletes those).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal

from sqlalchemy import func, select

from .. import money
from ..budgets import budget_of
from ..errors import ValidationError
from ..extensions import db
from ..models import UsageDay, UsageMonth, User, utcnow


@dataclass(frozen=True)
class ModelUsage:
    model: str
    tasks: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "tasks": self.tasks,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": money.as_json(self.cost_usd),
        }


@dataclass(frozen=True)
class DayUsage:
    day: date
    tasks: int
    cost_usd: Decimal

    def to_dict(self) -> dict:
        return {"day": self.day.isoformat(), "tasks": self.tasks, "cost_usd": money.as_json(self.cost_usd)}


@dataclass(frozen=True)
class MonthUsage:
    month: date
    spent_usd: Decimal
    reserved_usd: Decimal
    budget_usd: Decimal | None
    by_model: list[ModelUsage]
    # Every day of the month, in order, days without answers included.
    by_day: list[DayUsage] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.month:%Y-%m}"

    @property
    def resets_on(self) -> date:
        return money.next_month(self.month)

    @property
    def left_usd(self) -> Decimal | None:
        """What new work may still hold this month, or None without a budget."""
        if self.budget_usd is None:
            return None
        return max(money.ZERO, self.budget_usd - self.spent_usd - self.reserved_usd)

    def to_dict(self) -> dict:
        return {
            "month": self.label,
            "spent_usd": money.as_json(self.spent_usd),
            "reserved_usd": money.as_json(self.reserved_usd),
            "budget_usd": money.as_json(self.budget_usd),
            "by_model": [row.to_dict() for row in self.by_model],
            "by_day": [row.to_dict() for row in self.by_day],
        }


def parse_month(text: str | None) -> date:
    """Return the month a query asks for (this month when absent); ValidationError if not YYYY-MM."""
    if text is None:
        return money.month_of(utcnow())
    try:
        return money.parse_month(text)
    except ValueError as exc:
        raise ValidationError(str(exc), {"month": "YYYY-MM, like 2026-12"}) from None


def month_usage(user: User, month: date) -> MonthUsage:
    """Return the user's usage of one month."""
    row = db.session.execute(
        select(UsageMonth.spent_usd, UsageMonth.reserved_usd).where(
            UsageMonth.user_id == user.id, UsageMonth.month == month
        )
    ).first()
    end = money.next_month(month)
    in_month = (UsageDay.user_id == user.id, UsageDay.day >= month, UsageDay.day < end)
    models = db.session.execute(
        select(
            UsageDay.model,
            func.sum(UsageDay.tasks),
            func.sum(UsageDay.prompt_tokens),
            func.sum(UsageDay.completion_tokens),
            func.sum(UsageDay.cost_usd),
        )
        .where(*in_month)
        .group_by(UsageDay.model)
    ).all()
    by_model = sorted(
        (ModelUsage(m, int(n), int(p), int(c), Decimal(cost)) for m, n, p, c, cost in models),
        key=lambda usage: (-usage.cost_usd, -usage.tasks, usage.model),
    )
    days = {
        day: (int(n), Decimal(cost))
        for day, n, cost in db.session.execute(
            select(UsageDay.day, func.sum(UsageDay.tasks), func.sum(UsageDay.cost_usd))
            .where(*in_month)
            .group_by(UsageDay.day)
        )
    }
    by_day = [
        DayUsage(day, *days.get(day, (0, money.ZERO)))
        for day in (month + timedelta(days=n) for n in range((end - month).days))
    ]
    spent, held = (Decimal(row.spent_usd), Decimal(row.reserved_usd)) if row else (money.ZERO, money.ZERO)
    return MonthUsage(month, spent, held, budget_of(user), by_model, by_day)


@dataclass(frozen=True)
class UserSpend:
    username: str
    spent_usd: Decimal
    reserved_usd: Decimal
    budget_usd: Decimal | None


def spend_by_user(month: date, limit: int = 20) -> list[UserSpend]:
    """Return the month's biggest spenders (held reservations count too), for /admin."""
    rows = db.session.execute(
        select(User, UsageMonth.spent_usd, UsageMonth.reserved_usd)
        .join(UsageMonth, UsageMonth.user_id == User.id)
        .where(UsageMonth.month == month, (UsageMonth.spent_usd > 0) | (UsageMonth.reserved_usd > 0))
        .order_by(UsageMonth.spent_usd.desc(), UsageMonth.reserved_usd.desc(), User.username)
        .limit(limit)
    ).all()
    return [UserSpend(user.username, Decimal(spent), Decimal(held), budget_of(user)) for user, spent, held in rows]
