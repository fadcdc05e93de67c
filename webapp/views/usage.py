"""The /usage page: the month's spend, held reservations and budget, a chart by day and a table by model."""

from __future__ import annotations

from flask import Blueprint, render_template, request
from flask_login import current_user, login_required

from .. import money
from ..errors import ValidationError
from ..models import utcnow
from ..services import usage as service

bp = Blueprint("usage", __name__)


@bp.after_request
def no_store(response):
    response.headers.setdefault("Cache-Control", "no-store")
    return response


@bp.get("/usage")
@login_required
def index():
    """One month (?month=YYYY-MM, this month by default); a bad month says so and shows this month."""
    error = None
    try:
        month = service.parse_month(request.args.get("month") or None)
    except ValidationError as exc:
        error, month = exc.message, money.month_of(utcnow())
    this_month = money.month_of(utcnow())
    return render_template(
        "usage.html",
        usage=service.month_usage(current_user, month),
        error=error,
        previous=money.previous_month(month),
        following=money.next_month(month) if month < this_month else None,
        is_current=month == this_month,
    )
