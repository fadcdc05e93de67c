"""Per-model limits shared by every worker, in Redis: calls in flight, requests and tokens per minute.

A model's catalog entry may set `concurrency` (calls in flight at once), `rpm` (requests per
minute) and `tpm` (tokens per minute). Every worker process, on any machine, asks here before
it claims a task for that model; a task refused waits PENDING (deferred, like an open circuit
breaker), spending no attempt and holding no worker thread.

- **Concurrency** is a semaphore with expiring leases: one sorted set per model whose members
  are the jobs holding a slot, scored by when their hold expires. The worker renews the holds
  of its running jobs (with their task leases, `jobs/tracker.py`); a worker that dies stops
  renewing, and its slots expire after LEASE_SECONDS, so a dead worker never keeps one.
- **rpm and tpm** are GCRA (the generic cell rate algorithm: one timestamp per model and limit,
  the "theoretical arrival time"). Requests are spread evenly, one every 60/rpm seconds, with
  bursts of up to a sixth of the per-minute allowance after an idle spell; so any 60-second
  window sees at most 7/6 of the limit. A request's token cost is not known before the answer:
  it is charged as the prompt's length / 4 plus its `max_tokens`, and corrected by the usage the
  provider reports once the answer is in.

Each check is one Lua script, so concurrent workers never lose an update. If Redis is
unreachable the limits stay out of the way (calls are allowed), as the breaker does.

RQ 3.0's own `RateLimit` was considered: it caps jobs *queued or running* per key at enqueue
time, so a slot is held while the job waits in the queue, it has no requests or tokens per
minute, and its waiting jobs sit in a registry of their own that the sweeper does not read.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from webapp.catalog import ModelSpec

log = logging.getLogger(__name__)

UNREACHABLE = (RedisConnectionError, RedisTimeoutError)
SLOTS_KEY = "atr:limit:{}:slots"
RATE_KEY = "atr:limit:{}:{}"  # model, "rpm" or "tpm"
# A sixth of a minute's allowance may go at once after an idle spell.
BURST_SECONDS = 10.0

# KEYS[1] slots (zset), KEYS[2] rpm tat, KEYS[3] tpm tat.
# ARGV: now, holder, lease seconds, concurrency (0: none), rpm (0: none), tpm (0: none), token cost.
# Returns {0|1 allowed, seconds to wait, which limit refused}.
_ACQUIRE = """
local now = tonumber(ARGV[1])
local concurrency = tonumber(ARGV[4])
if concurrency > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZSCORE', KEYS[1], ARGV[2]) == false and redis.call('ZCARD', KEYS[1]) >= concurrency then
    return {0, '1', 'concurrency'}
  end
end
local function gcra(key, limit, cost)
  local interval = 60 / limit
  local burst = math.max(limit * tonumber(ARGV[8]) / 60, cost) * interval
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = tat + cost * interval
  local wait = new_tat - burst - now
  if wait > 0 then return wait end
  return -new_tat
end
local rpm, tpm, cost = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local rpm_tat, tpm_tat
if rpm > 0 then
  local r = gcra(KEYS[2], rpm, 1)
  if r > 0 then return {0, tostring(r), 'rpm'} end
  rpm_tat = -r
end
if tpm > 0 then
  local r = gcra(KEYS[3], tpm, math.min(cost, tpm))
  if r > 0 then return {0, tostring(r), 'tpm'} end
  tpm_tat = -r
end
if rpm_tat then redis.call('SET', KEYS[2], tostring(rpm_tat), 'EX', 120) end
if tpm_tat then redis.call('SET', KEYS[3], tostring(tpm_tat), 'EX', 120) end
if concurrency > 0 then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2]) end
return {1, '0', ''}
"""

# KEYS[1] tpm tat; ARGV: now, tpm, token difference (actual - charged). Moves the arrival time.
_ADJUST = """
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat == 0 then return 0 end
local now = tonumber(ARGV[1])
tat = tat + tonumber(ARGV[3]) * 60 / tonumber(ARGV[2])
if tat < now then tat = now end
redis.call('SET', KEYS[1], tostring(tat), 'EX', 120)
return 1
"""


@dataclass(frozen=True)
class Verdict:
    """Whether a call may start now; if not, how long to wait and which limit said no."""

    allowed: bool
    wait: float = 0.0
    limit: str = ""


@dataclass
class Hold:
    """A running call's claim on its model's limits: its slot and the tokens charged."""

    model: str
    holder: str
    tokens: int = 0
    slot: bool = False
    tpm: int = 0
    used: int | None = None  # tokens the call reported, once it has
    released: bool = field(default=False, repr=False)


def estimate_tokens(prompt_chars: int, system: str | None, max_tokens: int) -> int:
    """Return the tokens a call is charged before its answer: ~4 characters a token, plus max_tokens."""
    return (prompt_chars + len(system or "")) // 4 + max_tokens


class Limits:
    """The shared limits of every model, on one Redis connection."""

    def __init__(self, connection: Redis, lease_seconds: float):
        self.connection = connection
        self.lease_seconds = lease_seconds
        self._acquire = connection.register_script(_ACQUIRE)
        self._adjust = connection.register_script(_ADJUST)

    def acquire(self, spec: ModelSpec, holder: str, tokens: int) -> tuple[Verdict, Hold | None]:
        """Ask to start a call of `spec` now, for `holder` (a job id), costing about `tokens`."""
        if not (spec.concurrency or spec.rpm or spec.tpm):
            return Verdict(True), Hold(spec.name, holder)
        keys = [SLOTS_KEY.format(spec.name), RATE_KEY.format(spec.name, "rpm"), RATE_KEY.format(spec.name, "tpm")]
        args = [time.time(), holder, self.lease_seconds, spec.concurrency or 0, spec.rpm or 0, spec.tpm or 0]
        try:
            allowed, wait, which = self._acquire(keys=keys, args=[*args, tokens, BURST_SECONDS])
        except UNREACHABLE:
            log.warning("model limits: Redis unreachable; letting the call through")
            return Verdict(True), Hold(spec.name, holder)
        if not int(allowed):
            which = which.decode() if isinstance(which, bytes) else which
            return Verdict(False, max(float(wait), 0.05), which), None
        return Verdict(True), Hold(spec.name, holder, tokens, slot=bool(spec.concurrency), tpm=spec.tpm or 0)

    def renew(self, holds: list[Hold]) -> None:
        """Extend the slots of running calls by a lease (one round trip for all of them)."""
        held = [hold for hold in holds if hold.slot and not hold.released]
        if not held:
            return
        expires = time.time() + self.lease_seconds
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                for hold in held:
                    pipe.zadd(SLOTS_KEY.format(hold.model), {hold.holder: expires}, xx=True)
                pipe.execute()
        except UNREACHABLE:
            log.warning("model limits: could not renew %d slots (Redis unreachable)", len(held))

    def release(self, hold: Hold, used_tokens: int | None = None) -> None:
        """Give the slot back and correct the token charge with what the call really used."""
        if hold.released:
            return
        hold.released = True
        try:
            if hold.slot:
                self.connection.zrem(SLOTS_KEY.format(hold.model), hold.holder)
            if hold.tpm and used_tokens is not None and used_tokens != hold.tokens:
                self._adjust(
                    keys=[RATE_KEY.format(hold.model, "tpm")], args=[time.time(), hold.tpm, used_tokens - hold.tokens]
                )
        except UNREACHABLE:
            log.warning("model limits: could not release %s's slot (Redis unreachable); it expires", hold.holder)

    def in_flight(self, model: str) -> int:
        """Return the calls of `model` holding a slot now (tests, operators)."""
        return self.connection.zcount(SLOTS_KEY.format(model), time.time(), "+inf")


def limits() -> Limits:
    """Return the current app's limits (made on first use, on the app's Redis client)."""
    from flask import current_app

    from webapp.queues import redis

    app = current_app._get_current_object()
    found = app.extensions.get("model_limits")
    if found is None:
        found = app.extensions["model_limits"] = Limits(redis(), float(app.config["LEASE_SECONDS"]))
    return found
