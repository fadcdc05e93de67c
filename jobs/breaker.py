"""A circuit breaker per model, kept in Redis so every worker (of any kind) shares it.

When a model's provider keeps failing, calling it again only burns the attempts of every task
queued for it. After BREAKER_FAILURES transient failures in a row (no success in between) the
breaker opens: no worker calls that model for BREAKER_OPEN_SECONDS, and its tasks wait,
PENDING, without spending an attempt. Then one call is let through as a probe (half-open):
its success closes the breaker, its failure opens it again for twice as long (up to
BREAKER_MAX_OPEN_SECONDS).

State is one Redis hash per model, changed only by Lua scripts, so concurrent workers never
lose an update. If Redis is unreachable the breaker stays out of the way (calls are allowed):
it protects the provider and the attempts, it must never stop work by itself.

Written here rather than taken from pybreaker: its Redis storage updates counters with
separate commands (not atomic across processes), lets every caller through while half-open,
and cannot say when an open breaker will let calls through again, which is what a deferred
task needs to know.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from flask import current_app
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from webapp.queues import redis

KEY = "atr:breaker:{}"
# Redis errors that mean "unreachable": the breaker then stays out of the way.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError)

# KEYS[1] hash; ARGV now. Returns {state, seconds}: state 0 closed, 1 open (wait `seconds`),
# 2 half-open and this caller is the probe, 3 half-open and another probe is out (wait).
_ALLOW = """
local opened_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
local now = tonumber(ARGV[1])
if opened_until == 0 then return {0, '0'} end
if now < opened_until then return {1, tostring(opened_until - now)} end
local probe = tonumber(redis.call('HGET', KEYS[1], 'probe_until') or '0')
if now < probe then return {3, tostring(probe - now)} end
redis.call('HSET', KEYS[1], 'probe_until', tostring(now + tonumber(ARGV[2])))
return {2, '0'}
"""

# KEYS[1] hash; ARGV now, threshold, open seconds, max open seconds, idle expiry.
# Returns the seconds the breaker just opened for, or 0.
_FAILURE = """
local now = tonumber(ARGV[1])
local opened_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
local seconds = 0
if opened_until > 0 and now >= opened_until then
  -- a failed probe: open again, for longer
  seconds = math.min(tonumber(redis.call('HGET', KEYS[1], 'open_seconds') or ARGV[3]) * 2, tonumber(ARGV[4]))
elseif opened_until == 0 then
  local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
  if failures >= tonumber(ARGV[2]) then seconds = tonumber(ARGV[3]) end
end
if seconds > 0 then
  redis.call('HSET', KEYS[1], 'open_until', tostring(now + seconds), 'open_seconds', tostring(seconds),
             'probe_until', '0', 'failures', '0')
end
redis.call('EXPIRE', KEYS[1], math.ceil(seconds + tonumber(ARGV[5])))
return tostring(seconds)
"""


@dataclass(frozen=True)
class Verdict:
    """Whether a call to the model may go ahead now, and if not, how long to wait."""

    allowed: bool
    wait: float = 0.0
    probe: bool = False


class Breaker:
    """The breaker of one model."""

    def __init__(self, model: str, connection: Redis | None = None, config: dict | None = None):
        self.model = model
        self.key = KEY.format(model)
        self.connection = connection if connection is not None else redis()
        config = config if config is not None else current_app.config
        self.threshold = int(config["BREAKER_FAILURES"])
        self.open_seconds = float(config["BREAKER_OPEN_SECONDS"])
        self.max_open_seconds = float(config["BREAKER_MAX_OPEN_SECONDS"])

    def check(self, probe_seconds: float = 30.0) -> Verdict:
        """Ask to call the model now; a half-open breaker lets one caller through as the probe."""
        try:
            state, seconds = self.connection.eval(_ALLOW, 1, self.key, time.time(), probe_seconds)
        except UNREACHABLE:
            return Verdict(True)
        state, seconds = int(state), float(seconds)
        if state == 0:
            return Verdict(True)
        if state == 2:
            return Verdict(True, probe=True)
        return Verdict(False, max(seconds, 0.1))

    def failure(self) -> float:
        """Record a transient failure; return the seconds the breaker opened for (0: still closed)."""
        try:
            opened = float(
                self.connection.eval(
                    _FAILURE,
                    1,
                    self.key,
                    time.time(),
                    self.threshold,
                    self.open_seconds,
                    self.max_open_seconds,
                    self.max_open_seconds * 2,
                )
            )
        except UNREACHABLE:
            return 0.0
        return opened

    def success(self) -> None:
        """Record a success: the breaker closes and the failure count starts again."""
        with contextlib.suppress(*UNREACHABLE):
            self.connection.delete(self.key)

    def remaining(self) -> float:
        """Return how long the breaker stays open (0 when closed or half-open); no side effects."""
        try:
            until = self.connection.hget(self.key, "open_until")
        except UNREACHABLE:
            return 0.0
        return max(0.0, float(until or 0) - time.time())
