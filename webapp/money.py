"""Money and months: exact US-dollar amounts (Decimal here, NUMERIC in the database), never floats.

A cost is tokens times a price per million tokens, so it is exact in 12 decimal places when
prices have at most 6. Amounts are shown rounded for people (`usd`) and written into JSON as
numbers of at most 15 significant digits (`as_json`), which a JSON reader that parses numbers
as decimals (Python's `json.loads(..., parse_float=Decimal)`) gets back exactly.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from decimal import Context, Decimal, InvalidOperation

from sqlalchemy import Numeric

# Costs, reservations and spend. NUMERIC on PostgreSQL; SQLite (the embedded trial setup) has no
# decimal type and keeps these as floating point.
Amount = Numeric(24, 12)
# Prices in dollars per million tokens, and budgets in dollars, as operators type them.
Price = Numeric(18, 6)
Budget = Numeric(18, 6)

ZERO = Decimal(0)
PRICE_PLACES = 6
BUDGET_PLACES = 6
BUDGET_MAX = Decimal(1_000_000_000)
_JSON_DIGITS = Context(prec=15)
_MONTH = re.compile(r"^(\d{4})-(\d{2})$")


def cost(
    prompt_tokens: int | None, completion_tokens: int | None, per_million_in: Decimal, per_million_out: Decimal
) -> Decimal:
    """Return the exact cost of an answer: its tokens at prices per million tokens."""
    spent = Decimal(prompt_tokens or 0) * per_million_in + Decimal(completion_tokens or 0) * per_million_out
    return spent.scaleb(-6)


def parse_budget(text: str) -> Decimal:
    """Read a budget in dollars ("25", "12.50", "$7"); raise ValueError saying what is wrong."""
    raw = (text or "").strip().removeprefix("$").strip()
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ValueError(f"{text.strip()!r} is not an amount in dollars; write it like 25 or 12.50.") from None
    if not value.is_finite():
        raise ValueError(f"{text.strip()!r} is not an amount in dollars; write it like 25 or 12.50.")
    if value < 0:
        raise ValueError("A budget cannot be negative; use 0 to stop all paid work, or none for no limit.")
    if value > BUDGET_MAX:
        raise ValueError(f"A budget is at most {usd(BUDGET_MAX)} a month.")
    if -value.as_tuple().exponent > BUDGET_PLACES:
        raise ValueError(f"A budget has at most {BUDGET_PLACES} decimal places.")
    return value


def usd(amount: Decimal | None) -> str:
    """Return an amount for people: "$12.50", or more decimals when cents would hide it ("$0.000123")."""
    if amount is None:
        return "—"
    amount = Decimal(amount)
    cents = amount.quantize(Decimal("0.01"))
    if cents == amount or abs(amount) >= 1:
        return f"${cents:,}"
    # Under a dollar and not whole cents: six decimals, trailing zeros dropped (two kept).
    shown = f"{amount.quantize(Decimal('0.000001')):f}".rstrip("0")
    whole, _, fraction = shown.partition(".")
    return f"${whole}.{fraction.ljust(2, '0')}"


def as_json(amount: Decimal | None) -> float | None:
    """Return an amount as a JSON number: rounded to 15 significant digits, so its text is exact."""
    if amount is None:
        return None
    return float(_JSON_DIGITS.create_decimal(amount))


def month_of(moment: datetime | date) -> date:
    """Return the first day of the (UTC) month of a time or date."""
    if isinstance(moment, datetime):
        moment = moment.astimezone(UTC).date()
    return moment.replace(day=1)


def day_of(moment: datetime) -> date:
    """Return the (UTC) day of a time."""
    return moment.astimezone(UTC).date()


def next_month(month: date) -> date:
    """Return the first day of the month after `month`."""
    return date(month.year + 1, 1, 1) if month.month == 12 else date(month.year, month.month + 1, 1)


def previous_month(month: date) -> date:
    return date(month.year - 1, 12, 1) if month.month == 1 else date(month.year, month.month - 1, 1)


def parse_month(text: str) -> date:
    """Read "YYYY-MM" as the first day of that month; raise ValueError otherwise."""
    found = _MONTH.fullmatch(text or "")
    if not found or not 1 <= int(found.group(2)) <= 12 or int(found.group(1)) < 1:
        raise ValueError(f"{text!r} is not a month; write it as YYYY-MM, like 2026-12.")
    return date(int(found.group(1)), int(found.group(2)), 1)
