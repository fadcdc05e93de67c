"""What operators see: counts, throughput, latency, failures, tokens, queues and workers.

Fast with a million tasks (bench/admin_stats.py) because no request aggregates the whole table:

- unfinished tasks are counted through the small partial index `ix_tasks_unfinished`;
- finished tasks are counted as a base (those finished before a watermark about ten minutes
  back, one index-only scan of `ix_tasks_status_finished_at`, kept in Redis) plus those
  finished since the watermark (a short index range);
- the charts and tables over the last day are built from hourly rollups: an hour that ended is
  aggregated once and kept in Redis; each request reads only the current hour from the table;
- latency percentiles cover the last hour (what operators act on), a few thousand rows.

A finished task's `finished_at` does not move, so a past hour's rollup stays true. Retention
cleanup and bulk admin actions, which delete or reopen old tasks, call `forget()`; a single
task deleted or retried by its owner can leave a cached figure off by one until the watermark
moves on (ten minutes) or the hour leaves the window (a day). Without Redis everything is
computed from the table on each request: slower, still right.

PostgreSQL gets percentile_cont; the embedded SQLite computes the same figures in Python.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from redis import Redis
from redis.exceptions import RedisError
from rq.registry import ScheduledJobRegistry, StartedJobRegistry
from sqlalchemy import Integer, cast, func, select, text

from ..catalog import catalog
from ..extensions import db
from ..models import FINISHED, UNFINISHED, Task, TaskStatus, User, utcnow
from ..queues import QUEUE_NAMES, get_queue, live_workers

log = logging.getLogger(__name__)

HOUR = timedelta(hours=1)
PERCENTILES = (0.5, 0.95, 0.99)
TOP_USERS = 10
# A finished hour (or watermark) is cached only once it is this far in the past, so a worker
# whose clock runs a little behind cannot add a task to an hour already rolled up.
SETTLE = timedelta(minutes=5)
WATERMARK_STEP = 600
CACHE_PREFIX = "atr:stats"
GENERATION_KEY = f"{CACHE_PREFIX}:generation"


@dataclass(frozen=True)
class Bucket:
    start: datetime
    completed: int
    failed: int


@dataclass(frozen=True)
class Latency:
    model: str
    count: int
    wait: tuple[float | None, ...]  # p50, p95, p99 seconds from submission to the final attempt's start
    run: tuple[float | None, ...]  # p50, p95, p99 seconds of the final attempt


@dataclass(frozen=True)
class QueueDepth:
    name: str
    queued: int
    scheduled: int
    started: int


@dataclass
class Snapshot:
    now: datetime
    statuses: dict[str, int]
    per_minute: list[Bucket]
    per_hour: list[Bucket]
    latency: list[Latency]
    failures: list[tuple[str, str, int]]
    tokens_by_model: list[tuple[str, int, int]]
    tokens_by_user: list[tuple[str, int, int]]
    queues: list[QueueDepth] = field(default_factory=list)
    workers: int | None = None
    # Each model's waiting line and slots in use (jobs/limits.py).
    lines: list = field(default_factory=list)
    redis_error: str | None = None


def _postgres() -> bool:
    return db.engine.dialect.name == "postgresql"


class Cache:
    """Figures that do not change once settled, in Redis under a generation that forget() moves on."""

    def __init__(self, connection: Redis | None):
        self.connection = connection
        self.generation: int | None = None
        if connection is not None:
            try:
                self.generation = int(connection.get(GENERATION_KEY) or 0)
            except (RedisError, OSError):
                self.connection = None

    def _key(self, name: str) -> str:
        return f"{CACHE_PREFIX}:{self.generation}:{name}"

    def get_many(self, names: list[str]) -> list:
        if self.connection is None or not names:
            return [None] * len(names)
        try:
            raw = self.connection.mget([self._key(n) for n in names])
        except (RedisError, OSError):
            return [None] * len(names)
        return [json.loads(value) if value is not None else None for value in raw]

    def put_many(self, values: dict[str, object], ttl: int) -> None:
        if self.connection is None or not values:
            return
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                for name, value in values.items():
                    pipe.set(self._key(name), json.dumps(value), ex=ttl)
                pipe.execute()
        except (RedisError, OSError):
            log.debug("stats cache not written", exc_info=True)


def forget(connection: Redis) -> None:
    """Drop every cached figure (after deleting or reopening old tasks); old keys expire on their own."""
    try:
        connection.incr(GENERATION_KEY)
    except (RedisError, OSError):
        log.warning("stats cache not reset: Redis unavailable; cached figures correct themselves within a day")


def _watermark(now: datetime) -> datetime:
    settled = (now - SETTLE).timestamp()
    return datetime.fromtimestamp(math.floor(settled / WATERMARK_STEP) * WATERMARK_STEP, now.tzinfo)


def status_counts(connection: Redis | None = None, now: datetime | None = None) -> dict[str, int]:
    """Return how many tasks are in each status now (every status, zeros included)."""
    now = now or utcnow()
    counts = dict.fromkeys(TaskStatus.__members__, 0)
    rows = db.session.execute(
        select(Task.status, func.count()).where(Task.status.in_(UNFINISHED)).group_by(Task.status)
    ).all()
    counts.update(dict(rows))
    mark = _watermark(now)
    cache = Cache(connection)
    name = f"finished-before:{int(mark.timestamp())}"
    (base,) = cache.get_many([name])
    if base is None:
        before = db.session.execute(
            select(Task.status, func.count())
            .where(Task.status.in_(FINISHED), Task.finished_at < mark)
            .group_by(Task.status)
        ).all()
        base = dict(before)
        cache.put_many({name: base}, ttl=WATERMARK_STEP * 3)
    since = db.session.execute(
        select(Task.status, func.count())
        .where(Task.status.in_(FINISHED), Task.finished_at >= mark)
        .group_by(Task.status)
    ).all()
    for status, n in [*base.items(), *since]:
        counts[status] += n
    return counts


def _bucket(column, width: int):
    """Return the index of the `width`-second bucket a timestamp falls in."""
    if _postgres():
        return func.floor(func.extract("epoch", column) / width)
    return cast(func.strftime("%s", column), Integer) / width  # whole division of positive numbers


def _at(index: int, width: int, now: datetime) -> datetime:
    return datetime.fromtimestamp(index * width, now.tzinfo)


def per_minute(now: datetime) -> list[Bucket]:
    """Return completed and failed tasks per minute over the last hour, oldest first."""
    last = math.floor(now.timestamp() / 60)
    first = last - 59
    bucket = _bucket(Task.finished_at, 60).label("bucket")
    rows = db.session.execute(
        select(bucket, Task.status, func.count())
        .where(
            Task.status.in_((TaskStatus.COMPLETED.value, TaskStatus.FAILED.value)),
            Task.finished_at >= _at(first, 60, now),
        )
        .group_by(bucket, Task.status)
    ).all()
    seen: dict[tuple[int, str], int] = {(int(index), status): n for index, status, n in rows}
    return [
        Bucket(_at(i, 60, now), seen.get((i, TaskStatus.COMPLETED.value), 0), seen.get((i, TaskStatus.FAILED.value), 0))
        for i in range(first, last + 1)
    ]


def _empty() -> dict:
    """A rollup: what finished in some hours, in a JSON-friendly shape that merges by addition."""
    return {"hours": {}, "failures": {}, "tokens_model": {}, "tokens_user": {}}


def _merge(into: dict, other: dict) -> dict:
    for hour, (completed, failed) in other["hours"].items():
        c, f = into["hours"].get(hour, (0, 0))
        into["hours"][hour] = [c + completed, f + failed]
    for model, kinds in other["failures"].items():
        mine = into["failures"].setdefault(model, {})
        for kind, n in kinds.items():
            mine[kind] = mine.get(kind, 0) + n
    for table in ("tokens_model", "tokens_user"):
        for key, (prompt, completion) in other[table].items():
            p, c = into[table].get(key, (0, 0))
            into[table][key] = [p + prompt, c + completion]
    return into


def _aggregate_hours(first: int, end: int, now: datetime) -> dict[int, dict]:
    """Roll up each hour in [first, end) from the table: two queries over that range."""
    hours = {h: _empty() for h in range(first, end)}
    for h, rollup in hours.items():
        rollup["hours"][str(h)] = [0, 0]
    window = (Task.finished_at >= _at(first, 3600, now), Task.finished_at < _at(end, 3600, now))
    bucket = _bucket(Task.finished_at, 3600).label("bucket")
    kind = func.coalesce(Task.error_kind, "unknown").label("kind")
    outcomes = db.session.execute(
        select(bucket, Task.status, Task.model, kind, func.count())
        .where(*window, Task.status.in_((TaskStatus.COMPLETED.value, TaskStatus.FAILED.value)))
        .group_by(bucket, Task.status, Task.model, kind)
    ).all()
    for index, status, model, kind_, n in outcomes:
        rollup = hours[int(index)]
        counts = rollup["hours"][str(int(index))]
        if status == TaskStatus.COMPLETED.value:
            counts[0] += n
        else:
            counts[1] += n
            kinds = rollup["failures"].setdefault(model, {})
            kinds[kind_] = kinds.get(kind_, 0) + n
    used = db.session.execute(
        select(
            bucket,
            Task.model,
            Task.user_id,
            func.coalesce(func.sum(Task.prompt_tokens), 0),
            func.coalesce(func.sum(Task.completion_tokens), 0),
        )
        .where(*window, Task.completion_tokens.is_not(None))
        .group_by(bucket, Task.model, Task.user_id)
    ).all()
    for index, model, user_id, prompt, completion in used:
        rollup = hours[int(index)]
        for table, key in (("tokens_model", model), ("tokens_user", str(user_id))):
            p, c = rollup[table].get(key, (0, 0))
            rollup[table][key] = [p + int(prompt), c + int(completion)]
    return hours


def last_day(now: datetime, cache: Cache) -> dict:
    """Return the rollup of the last 24 hours (the current one included).

    The settled hours are folded into one cached rollup, built from per-hour rollups (cached
    too, so the next hour's fold reads 22 of them and aggregates one); the hours not settled
    yet, usually just the current one, are read from the table on every call.
    """
    current = math.floor(now.timestamp() / 3600)
    hours = list(range(current - 23, current + 1))
    settled_before = (now - SETTLE).timestamp()
    settled = [h for h in hours if (h + 1) * 3600 <= settled_before]
    fresh = [h for h in hours if h not in settled]
    total = _empty()
    if settled:
        name = f"day:{settled[0]}:{settled[-1]}"
        (folded,) = cache.get_many([name])
        if folded is None:
            names = [f"hour:{h}" for h in settled]
            per_hour = dict(zip(settled, cache.get_many(names), strict=True))
            missing = [h for h, value in per_hour.items() if value is None]
            if missing:
                computed = _aggregate_hours(missing[0], missing[-1] + 1, now)
                per_hour.update({h: computed[h] for h in missing})
                cache.put_many({f"hour:{h}": computed[h] for h in missing}, ttl=26 * 3600)
            folded = _empty()
            for h in settled:
                _merge(folded, per_hour[h])
            cache.put_many({name: folded}, ttl=2 * 3600)
        _merge(total, folded)
    for rollup in _aggregate_hours(fresh[0], fresh[-1] + 1, now).values():
        _merge(total, rollup)
    return total


def _percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks, as PostgreSQL's percentile_cont."""
    if not values:
        return None
    position = (len(values) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return values[low] + (values[high] - values[low]) * (position - low)


def latency(since: datetime) -> list[Latency]:
    """Return queue wait and run time percentiles per model, for tasks completed since `since`."""
    if _postgres():
        rows = db.session.execute(
            text(
                """
                SELECT model, count(*) AS n,
                  percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP
                    (ORDER BY extract(epoch FROM started_at - created_at)) AS wait,
                  percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP
                    (ORDER BY extract(epoch FROM finished_at - started_at)) AS run
                FROM tasks
                WHERE finished_at >= :since AND status = 'COMPLETED' AND started_at IS NOT NULL
                GROUP BY model ORDER BY model
                """
            ),
            {"since": since},
        ).all()
        return [Latency(r.model, r.n, tuple(r.wait), tuple(r.run)) for r in rows]
    rows = db.session.execute(
        select(Task.model, Task.created_at, Task.started_at, Task.finished_at).where(
            Task.finished_at >= since, Task.status == TaskStatus.COMPLETED.value, Task.started_at.is_not(None)
        )
    ).all()
    by_model: dict[str, tuple[list[float], list[float]]] = {}
    for model, created, started, finished in rows:
        waits, runs = by_model.setdefault(model, ([], []))
        waits.append((started - created).total_seconds())
        runs.append((finished - started).total_seconds())
    result = []
    for model, (waits, runs) in sorted(by_model.items()):
        waits.sort()
        runs.sort()
        result.append(
            Latency(
                model,
                len(waits),
                tuple(_percentile(waits, q) for q in PERCENTILES),
                tuple(_percentile(runs, q) for q in PERCENTILES),
            )
        )
    return result


def queue_depths(connection: Redis) -> list[QueueDepth]:
    """Return the jobs waiting, scheduled and running per queue, in one round trip."""
    with connection.pipeline(transaction=False) as pipe:
        for name in QUEUE_NAMES:
            queue = get_queue(name, connection)
            pipe.llen(queue.key)
            pipe.zcard(ScheduledJobRegistry(queue=queue).key)
            pipe.zcard(StartedJobRegistry(queue=queue).key)
        values = pipe.execute()
    return [QueueDepth(name, *values[i * 3 : i * 3 + 3]) for i, name in enumerate(QUEUE_NAMES)]


def model_lines() -> list:
    """Return each catalog model's line length and slots in use, by name."""
    from jobs.limits import model_limits

    return model_limits().lines(sorted(catalog(), key=lambda spec: spec.name))


def workers_online(connection: Redis) -> int:
    return len(live_workers(connection))


def _summarise(day: dict, now: datetime):
    current = math.floor(now.timestamp() / 3600)
    per_hour = [Bucket(_at(h, 3600, now), *day["hours"].get(str(h), (0, 0))) for h in range(current - 23, current + 1)]
    failures = sorted(
        ((model, kind, n) for model, kinds in day["failures"].items() for kind, n in kinds.items()),
        key=lambda row: (-row[2], row[0], row[1]),
    )
    tokens_by_model = sorted(
        ((m, p, c) for m, (p, c) in day["tokens_model"].items()), key=lambda row: (-(row[1] + row[2]), row[0])
    )
    top = sorted(day["tokens_user"].items(), key=lambda item: (-(item[1][0] + item[1][1]), int(item[0])))[:TOP_USERS]
    ids = [int(user_id) for user_id, _ in top]
    names = dict(db.session.execute(select(User.id, User.username).where(User.id.in_(ids))).all()) if ids else {}
    tokens_by_user = [(names.get(int(user_id), f"#{user_id}"), p, c) for user_id, (p, c) in top]
    return per_hour, failures, tokens_by_model, tokens_by_user


def snapshot(connection: Redis, now: datetime | None = None) -> Snapshot:
    """Return everything the stats page shows; Redis being down blanks only its part."""
    now = now or utcnow()
    cache = Cache(connection)
    per_hour, fails, tokens_by_model, tokens_by_user = _summarise(last_day(now, cache), now)
    snap = Snapshot(
        now=now,
        statuses=status_counts(connection, now),
        per_minute=per_minute(now),
        per_hour=per_hour,
        latency=latency(now - HOUR),
        failures=fails,
        tokens_by_model=tokens_by_model,
        tokens_by_user=tokens_by_user,
    )
    db.session.rollback()  # end the read transaction; nothing was written
    try:
        snap.queues = queue_depths(connection)
        snap.workers = workers_online(connection)
        snap.lines = model_lines()
    except (RedisError, OSError) as exc:
        snap.redis_error = type(exc).__name__
    return snap
