"""Rate limits: counted in Redis (so every web process shares them) with the `limits` library.

Each limit is a setting holding the `limits` syntax ("60/minute", "5/minute;20/hour"; empty means
none) and is counted per key (a user id, an account name, a client address) in a moving window,
so "60/minute" means at most 60 in any 60 seconds, and the wait it answers is exact.

Everything reads the app's configuration when it is asked, not when the app is created:
`RATELIMIT_ENABLED=false` turns every limit off for that app alone (benchmarks, most tests), and
a test can turn limits on for one test with `monkeypatch.setitem(app.config, ...)`.
A Redis outage lets requests through (and is logged): a limit must not turn an outage of the
counter into an outage of sign-in or submission.
"""

from __future__ import annotations

import logging
import math
import time
from functools import cache

from flask import Flask, current_app
from limits import RateLimitItem, parse_many
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

# Keys are LIMITS:<prefix>/<setting>/<key>/<amount>/<period>: a changed limit starts afresh.
PREFIX = "atr:limits"


@cache
def _items(spec: str) -> tuple[RateLimitItem, ...]:
    return tuple(parse_many(spec)) if spec.strip() else ()


def validate(spec: str, setting: str) -> None:
    """Raise ValueError naming the setting if `spec` is not in the limits syntax."""
    try:
        _items(spec)
    except ValueError:
        raise ValueError(f'{setting} must look like "60/minute" or "5/minute;20/hour", not {spec!r}') from None


class RateLimits:
    """The app's rate limits, kept in its Redis (the same connection pool as everything else)."""

    def __init__(self, connection: Redis):
        storage = RedisStorage("redis://", connection_pool=connection.connection_pool, key_prefix=PREFIX)
        self.strategy = MovingWindowRateLimiter(storage)

    def wait(self, setting: str, *key: str) -> int | None:
        """Return the seconds to wait if a limit of `setting` is used up for `key`, else None. Counts nothing."""
        items = self._active(setting)
        try:
            used_up = [item for item in items if not self.strategy.test(item, setting, *key)]
            waits = [self._reset_in(item, setting, *key) for item in used_up]
        except (RedisError, OSError) as exc:
            log.warning("rate limit %s not checked: Redis unavailable (%s)", setting, type(exc).__name__)
            return None
        return max(waits) if waits else None

    def hit(self, setting: str, *key: str) -> int | None:
        """Count one request against every limit of `setting`; return the seconds to wait if one was used up."""
        items = self._active(setting)
        try:
            refused = [item for item in items if not self.strategy.hit(item, setting, *key)]
            waits = [self._reset_in(item, setting, *key) for item in refused]
        except (RedisError, OSError) as exc:
            log.warning("rate limit %s not counted: Redis unavailable (%s)", setting, type(exc).__name__)
            return None
        return max(waits) if waits else None

    def _active(self, setting: str) -> tuple[RateLimitItem, ...]:
        config = current_app.config
        return _items(config[setting]) if config["RATELIMIT_ENABLED"] else ()

    def _reset_in(self, item: RateLimitItem, *key: str) -> int:
        reset_at, _ = self.strategy.get_window_stats(item, *key)
        return max(1, math.ceil(reset_at - time.time()))


def init_app(app: Flask) -> None:
    for setting in ("SUBMIT_LIMIT", "LOGIN_LIMIT_PER_ACCOUNT", "LOGIN_LIMIT_PER_ADDRESS"):
        validate(app.config[setting], setting)
    app.extensions["ratelimits"] = RateLimits(app.extensions["redis"])


def rate_limits() -> RateLimits:
    """Return the app's per-user and per-address rate limits (submissions, sign-ins)."""
    return current_app.extensions["ratelimits"]
