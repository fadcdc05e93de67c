"""A second app on the tests' database and Redis whose catalog has prices and fallbacks.

The session `app` (tests/conftest.py) keeps the shared catalog; cost and fallback tests build
this one beside it (same schema, same cleanup) with models of their own on the fake provider.
"""

from __future__ import annotations

from decimal import Decimal

from webapp import create_app
from webapp.extensions import db
from webapp.models import Task, UsageMonth

OVERRIDES = (
    "TESTING",
    "SECRET_KEY",
    "DATABASE_URL",
    "REDIS_URL",
    "PROGRESS_INTERVAL",
    "RETRY_BASE_SECONDS",
    "RETRY_MAX_SECONDS",
    "RATELIMIT_ENABLED",
)


def priced_models(url: str) -> dict[str, dict]:
    """Models of the fake provider with prices (dollars per million tokens) and a fallback chain."""
    base = {"base_url": url, "max_tokens": 1024, "default_max_tokens": 64, "timeout": 10, "read_timeout": 2}
    return {
        "cheap": {
            **base,
            "upstream": "cheap",
            "usd_per_million_input_tokens": "0.15",
            "usd_per_million_output_tokens": "0.6",
        },
        "dear": {
            **base,
            "upstream": "dear",
            "usd_per_million_input_tokens": "2.5",
            "usd_per_million_output_tokens": "10",
        },
        "free": {**base, "upstream": "free"},
        # Falls back to dear, then cheap: its reservation is priced at dear.
        "chained": {
            **base,
            "upstream": "chained",
            "usd_per_million_input_tokens": "1",
            "usd_per_million_output_tokens": "2",
            "fallbacks": ["dear", "cheap"],
        },
    }


def make_priced_app(app, url: str, **config):
    """Return an app like `app` whose catalog is `priced_models` (plus `config` overrides)."""
    overrides = {name: app.config[name] for name in OVERRIDES}
    return create_app(
        {**overrides, "MODELS_FILE": None, "DEFAULT_MODEL": "cheap", "MODELS": priced_models(url), **config}
    )


def ledger(app, user_id: int) -> dict:
    """Return a user's months as {month: (spent, reserved)}, and check no reservation is left unaccounted.

    What the months hold must equal what the user's unfinished tasks hold: the invariant that a
    reservation is never left behind nor released twice.
    """
    with app.app_context():
        months = {
            row.month: (Decimal(row.spent_usd), Decimal(row.reserved_usd))
            for row in db.session.scalars(db.select(UsageMonth).where(UsageMonth.user_id == user_id))
        }
        held = db.session.scalar(
            db.select(db.func.coalesce(db.func.sum(Task.reserved_usd), 0)).where(
                Task.user_id == user_id, Task.status.in_(("PENDING", "PROCESSING"))
            )
        )
        db.session.remove()
    assert sum((reserved for _, reserved in months.values()), Decimal(0)) == Decimal(held), (months, held)
    return months
