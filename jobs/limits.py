"""Per-model limits shared by every worker, in Redis: calls in flight, requests and tokens per minute.

A model's catalog entry may set `concurrency` (calls in flight at once), `rpm` (requests per
minute) and `tpm` (tokens per minute). Every worker process, on any machine, asks here before
it claims a task for that model; a task refused waits PENDING (deferred, like an open circuit
breaker), spending no attempt and holding no worker thread.

- **Concurrency** is a semaphore with expiring leases and a waiting line. Slots: one sorted set
  per model whose members are the jobs holding a slot, scored by when their hold expires; the
  worker renews the holds of its running jobs (with their task leases, `jobs/tracker.py`), and a
  worker that dies stops renewing, so its slots expire after LEASE_SECONDS. Line: a task that
  finds no free slot (or others waiting ahead of it) joins its model's line, a sorted set ordered
  by priority then submission, and its job ends: no timer, no polling. Whoever frees a slot
  (a call ending, a refused probe, the sweeper finding slots expired) hands it to the head of the
  line in the same script, as a reservation (`task-<id>`, expiring after a lease), and enqueues a
  job for that task at the front of its queue; the task's next acquire takes the reservation.
  So slots never sit idle while tasks wait, tasks start in order, and a backlog costs one parking
  and one wake-up per task (`bench/limited.py`).
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
LINE_KEY = "atr:limit:{}:line"
TURNS_KEY = "atr:limit:{}:turns"
RATE_KEY = "atr:limit:{}:{}"  # model, "rpm" or "tpm"
# A sixth of a minute's allowance may go at once after an idle spell.
BURST_SECONDS = 10.0

# Shared by the scripts: KEYS[1] slots, KEYS[4] line; ARGV[1] now, ARGV[3] lease, ARGV[4] concurrency.
# Hands the free slots to the tasks at the head of the line, as reservations; returns their ids.
_PUMP = """
local function pump(woken)
  local concurrency = tonumber(ARGV[4])
  if concurrency <= 0 then return woken end
  local now = tonumber(ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  local free = concurrency - redis.call('ZCARD', KEYS[1])
  while free > 0 do
    local head = redis.call('ZPOPMIN', KEYS[4])
    if #head == 0 then break end
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), 'task-' .. head[1])
    woken[#woken + 1] = head[1]
    free = free - 1
    -- The line's clock of fair turns moves to the turn of the task that left it.
    local score = tonumber(head[2])
    local band = math.floor(score / 1e12)
    local turn = math.floor((score % 1e12) / 1e6)
    if turn > tonumber(redis.call('HGET', KEYS[5], 'v:' .. band) or '0') then
      redis.call('HSET', KEYS[5], 'v:' .. band, turn)
    end
  end
  -- An empty line starts its turns again (so they stay far below a band's width).
  if redis.call('EXISTS', KEYS[4]) == 0 then redis.call('DEL', KEYS[5]) end
  return woken
end
"""

# KEYS[4] line, KEYS[5] the line's turns; ARGV[10] task id, ARGV[11] its place, ARGV[12] its owner.
# Joins the line: with an owner, fairly (see `line_place`); returns whether the task was added.
_JOIN = """
local function join()
  local place = tonumber(ARGV[11])
  if ARGV[12] ~= '' then
    local band = math.floor(place / 1e12)
    local mine = 'u:' .. band .. ':' .. ARGV[12]
    local clock = tonumber(redis.call('HGET', KEYS[5], 'v:' .. band) or '0')
    local turn = math.max(tonumber(redis.call('HGET', KEYS[5], mine) or '0') + 1, clock)
    place = band * 1e12 + turn * 1e6 + tonumber(ARGV[10]) % 1e6
    if redis.call('ZADD', KEYS[4], 'NX', place, ARGV[10]) == 1 then redis.call('HSET', KEYS[5], mine, turn) end
  else
    redis.call('ZADD', KEYS[4], 'NX', place, ARGV[10])
  end
end
"""

# KEYS[1] slots (zset), KEYS[2] rpm tat, KEYS[3] tpm tat, KEYS[4] line (zset).
# ARGV: now, holder, lease seconds, concurrency (0: none), rpm (0: none), tpm (0: none), token cost,
# burst seconds, the task's reservation name, the task id, its place in line (priority, submission),
# its owner ('' for none: the place is used as it is). KEYS[5] the line's turns (hash).
# Returns {0|1 allowed, seconds to wait, which limit refused, task ids woken...}; refused by
# 'concurrency' means the task is in line (wait 0).
_ACQUIRE = (
    _PUMP
    + _JOIN
    + """
local now = tonumber(ARGV[1])
local concurrency = tonumber(ARGV[4])
local woken = {}
local reserved = false
if concurrency > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZSCORE', KEYS[1], ARGV[2]) == false then
    if redis.call('ZSCORE', KEYS[1], ARGV[9]) == false then
      -- Holding nothing: join the line, and let the line take the free slots in its order.
      join()
      pump(woken)
      local mine = false
      for i, id in ipairs(woken) do
        if id == ARGV[10] then mine = true; table.remove(woken, i); break end
      end
      if not mine then return {0, '0', 'concurrency', unpack(woken)} end
    end
    reserved = true
  end
end
local function refuse(wait, which)
  if reserved then
    redis.call('ZREM', KEYS[1], ARGV[9])
    pump(woken)
  end
  return {0, tostring(wait), which, unpack(woken)}
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
  if r > 0 then return refuse(r, 'rpm') end
  rpm_tat = -r
end
if tpm > 0 then
  local r = gcra(KEYS[3], tpm, math.min(cost, tpm))
  if r > 0 then return refuse(r, 'tpm') end
  tpm_tat = -r
end
if rpm_tat then redis.call('SET', KEYS[2], tostring(rpm_tat), 'EX', 120) end
if tpm_tat then redis.call('SET', KEYS[3], tostring(tpm_tat), 'EX', 120) end
if concurrency > 0 then
  if reserved then redis.call('ZREM', KEYS[1], ARGV[9]) end
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
end
return {1, '0', '', unpack(woken)}
"""
)

# KEYS[1] slots, KEYS[4] line (KEYS[2], KEYS[3] unused); ARGV: now, holder to drop ('' for none),
# lease, concurrency. Frees the holder's slot and hands free slots to the line; returns woken ids.
_RELEASE = (
    _PUMP
    + """
if ARGV[2] ~= '' then redis.call('ZREM', KEYS[1], ARGV[2]) end
return pump({})
"""
)

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
    limit: str = ""  # "concurrency": the task is in its model's line, and will be woken
    woken: tuple[int, ...] = ()  # tasks given a slot by this call: enqueue them (`jobs.run_task.wake`)


@dataclass
class Hold:
    """A running call's claim on its model's limits: its slot and the tokens charged."""

    model: str
    holder: str
    tokens: int = 0
    concurrency: int = 0
    slot: bool = False
    tpm: int = 0
    used: int | None = None  # tokens the call reported, once it has
    released: bool = field(default=False, repr=False)


def estimate_tokens(prompt_chars: int, system: str | None, max_tokens: int) -> int:
    """Return the tokens a call is charged before its answer: ~4 characters a token, plus max_tokens."""
    return (prompt_chars + len(system or "")) // 4 + max_tokens


@dataclass(frozen=True)
class ModelLine:
    """A model's waiting line and slots, as /admin shows them."""

    model: str
    waiting: int
    in_use: int  # slots held: running calls, and slots reserved for woken tasks
    concurrency: int


class ModelLimits:
    """The shared limits of every model, on one Redis connection."""

    def __init__(self, connection: Redis, lease_seconds: float):
        self.connection = connection
        self.lease_seconds = lease_seconds
        self._acquire = connection.register_script(_ACQUIRE)
        self._release = connection.register_script(_RELEASE)
        self._adjust = connection.register_script(_ADJUST)

    @staticmethod
    def _keys(model: str) -> list[str]:
        return [
            SLOTS_KEY.format(model),
            RATE_KEY.format(model, "rpm"),
            RATE_KEY.format(model, "tpm"),
            LINE_KEY.format(model),
            TURNS_KEY.format(model),
        ]

    def acquire(
        self, spec: ModelSpec, holder: str, tokens: int, task_id: int, place: int = 0, owner: int | None = None
    ) -> tuple[Verdict, Hold | None]:
        """Ask to start a call of `spec` now, for `holder` (a job id) of `task_id`, costing about `tokens`.

        `place` orders the model's line (lower goes first): see `line_place`. With the task's
        `owner` (a user id) the line is fair across owners within a priority.
        """
        if not (spec.concurrency or spec.rpm or spec.tpm):
            return Verdict(True), Hold(spec.name, holder)
        args = [time.time(), holder, self.lease_seconds, spec.concurrency or 0, spec.rpm or 0, spec.tpm or 0]
        try:
            allowed, wait, which, *woken = self._acquire(
                keys=self._keys(spec.name),
                args=[*args, tokens, BURST_SECONDS, f"task-{task_id}", task_id, place, "" if owner is None else owner],
            )
        except UNREACHABLE:
            log.warning("model limits: Redis unreachable; letting the call through")
            return Verdict(True), Hold(spec.name, holder)
        woken_ids = tuple(int(task) for task in woken)
        if not int(allowed):
            which = which.decode() if isinstance(which, bytes) else which
            wait = 0.0 if which == "concurrency" else max(float(wait), 0.05)
            return Verdict(False, wait, which, woken_ids), None
        hold = Hold(spec.name, holder, tokens, spec.concurrency or 0, slot=bool(spec.concurrency), tpm=spec.tpm or 0)
        return Verdict(True, woken=woken_ids), hold

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

    def release(self, hold: Hold, used_tokens: int | None = None) -> tuple[int, ...]:
        """Give the slot back and correct the token charge with what the call really used.

        Returns the tasks the freed slot went to (the head of the line): enqueue them.
        """
        if hold.released:
            return ()
        hold.released = True
        woken: tuple[int, ...] = ()
        try:
            if hold.slot:
                woken = self._pump(hold.model, hold.concurrency, hold.holder)
            if hold.tpm and used_tokens is not None and used_tokens != hold.tokens:
                self._adjust(
                    keys=[RATE_KEY.format(hold.model, "tpm")], args=[time.time(), hold.tpm, used_tokens - hold.tokens]
                )
        except UNREACHABLE:
            log.warning("model limits: could not release %s's slot (Redis unreachable); it expires", hold.holder)
        return woken

    def pump(self, spec: ModelSpec) -> tuple[int, ...]:
        """Hand the model's free slots (expired ones included) to its line; return the tasks woken."""
        return self._pump(spec.name, spec.concurrency or 0, "")

    def unreserve(self, model: str, concurrency: int, task_id: int) -> tuple[int, ...]:
        """Take back a woken task's reservation (it is no longer waiting); return the tasks woken instead."""
        return self._pump(model, concurrency, f"task-{task_id}")

    def _pump(self, model: str, concurrency: int, drop: str) -> tuple[int, ...]:
        woken = self._release(keys=self._keys(model), args=[time.time(), drop, self.lease_seconds, concurrency])
        return tuple(int(task) for task in woken)

    def waiting(self, models: list[str]) -> set[int]:
        """Return the tasks in the lines of these models (the sweeper leaves them alone)."""
        with self.connection.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.zrange(LINE_KEY.format(model), 0, -1)
            return {int(task) for members in pipe.execute() for task in members}

    def ahead_of(self, model: str, task_id: int) -> int | None:
        """Return how many tasks wait ahead of `task_id` in its model's line; None when it is not in it."""
        return self.connection.zrank(LINE_KEY.format(model), task_id)

    def lines(self, specs) -> list[ModelLine]:
        """Return each model's line and the slots its calls hold now (one round trip)."""
        specs = list(specs)
        now = time.time()
        with self.connection.pipeline(transaction=False) as pipe:
            for spec in specs:
                pipe.zcard(LINE_KEY.format(spec.name))
                pipe.zcount(SLOTS_KEY.format(spec.name), now, "+inf")
            values = pipe.execute()
        return [
            ModelLine(spec.name, values[2 * i], values[2 * i + 1], spec.concurrency) for i, spec in enumerate(specs)
        ]

    def in_flight(self, model: str) -> int:
        """Return the calls of `model` holding a slot now (tests, operators)."""
        return self.connection.zcount(SLOTS_KEY.format(model), time.time(), "+inf")


def line_place(priority: int, task_id: int) -> int:
    """Return a task's place in its model's line: higher priority first, then the order of submission.

    Given the task's owner, `acquire` makes it fair within a priority: the line is round robin
    across users. Each owner's tasks take turns 1, 2, 3, … in the order they join, a newcomer's
    first turn being the line's current turn (that of the last task to leave it), and the line
    is ordered by priority, then turn, then submission. So a user with 40 tasks waiting does not
    hold up another's task submitted after them for more than about one task per waiting user:
    the newcomer's task is next in line once the tasks of its turn have started.
    """
    return (10 - priority) * 10**12 + task_id


def model_limits() -> ModelLimits:
    """Return the current app's per-model limits (made on first use, on the app's Redis client)."""
    from flask import current_app

    from webapp.queues import redis

    app = current_app._get_current_object()
    found = app.extensions.get("model_limits")
    if found is None:
        found = app.extensions["model_limits"] = ModelLimits(redis(), float(app.config["LEASE_SECONDS"]))
    return found
