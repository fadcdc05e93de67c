"""Prometheus metrics that are right across processes and machines.

Workers run in other processes (other containers) than the web process that serves /metrics,
so in-process counters would show only what one process saw. Instead:

- counters and histograms live in Redis: each event is one pipelined round trip of HINCRBY /
  HINCRBYFLOAT on two hashes, from whichever process saw it (jobs/events.py, task submission);
- gauges are computed at scrape time: tasks by status from PostgreSQL, queue depths and
  workers from Redis.

A custom collector turns both into metric families when /metrics is scraped. If Redis loses
its data the counters start again from zero, which Prometheus reads as a counter reset.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from flask import Blueprint, Response, current_app
from flask_login import current_user
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from redis import Redis
from redis.exceptions import RedisError

from .auth import bearer_token
from .errors import AuthError, ForbiddenError, NotFoundError

log = logging.getLogger(__name__)

COUNTERS_KEY = "atr:metrics:counters"
HISTOGRAMS_KEY = "atr:metrics:histograms"


@dataclass(frozen=True)
class Spec:
    name: str
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


COUNTERS = {
    spec.name: spec
    for spec in (
        Spec("atr_tasks_submitted", "Tasks submitted (pages and API).", ("model",)),
        Spec("atr_task_attempts", "Attempts started by workers (claims).", ("model",)),
        Spec("atr_tasks_completed", "Tasks completed.", ("model",)),
        Spec("atr_tasks_failed", "Tasks that failed for good, by error kind.", ("model", "kind")),
        Spec("atr_task_retries", "Attempts that failed and were scheduled again, by error kind.", ("model", "kind")),
        Spec("atr_provider_errors", "Failed attempts by error class (retried or final).", ("model", "kind")),
        Spec("atr_tasks_stopped", "Attempts stopped: the task was cancelled, deleted or taken back.", ("model",)),
        Spec("atr_tokens", "Tokens used by completed tasks.", ("model", "type")),
        Spec(
            "atr_tasks_deferred",
            "Jobs deferred unclaimed: the model's circuit breaker was open, or its rpm/tpm limit reached.",
            ("model",),
        ),
        Spec("atr_tasks_waited", "Jobs that found the model at its concurrency and joined its line.", ("model",)),
        Spec("atr_tasks_handed_back", "Attempts handed back unfinished by a worker shutting down.", ("model",)),
        Spec(
            "atr_tasks_released",
            "Tasks taken back at once from an attempt that could not finish (thread died, worker stopped).",
            (),
        ),
        Spec("atr_circuit_opened", "Times a model's circuit breaker opened.", ("model",)),
        Spec(
            "atr_webhook_deliveries",
            "Webhook tries by outcome: delivered, retried (failed, another try is due) or failed (no tries left).",
            ("outcome",),
        ),
    )
}
HISTOGRAMS = {
    spec.name: spec
    for spec in (
        Spec(
            "atr_task_queue_wait_seconds",
            "Seconds a job waited in its queue before a worker claimed its task.",
            ("model",),
            (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
        ),
        Spec(
            "atr_task_run_seconds",
            "Seconds a successful attempt took, from claim to the final write.",
            ("model",),
            (0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600),
        ),
    )
}


def _field(*parts) -> str:
    # JSON keeps any label value (a model name with '|' or ',') unambiguous.
    return json.dumps(parts, separators=(",", ":"))


@dataclass
class Batch:
    """Metric updates of one event, sent to Redis in one round trip."""

    counters: list[tuple[str, dict, float]] = field(default_factory=list)
    observations: list[tuple[str, dict, float]] = field(default_factory=list)

    def inc(self, name: str, amount: float = 1, **labels: str) -> Batch:
        assert name in COUNTERS and set(labels) == set(COUNTERS[name].labels), name
        if amount:
            self.counters.append((name, labels, amount))
        return self

    def observe(self, name: str, value: float, **labels: str) -> Batch:
        assert name in HISTOGRAMS and set(labels) == set(HISTOGRAMS[name].labels), name
        self.observations.append((name, labels, max(0.0, value)))
        return self

    def send(self, connection: Redis | None = None) -> None:
        """Write the updates; a Redis outage loses them and is logged, never raised."""
        if not self.counters and not self.observations:
            return
        connection = connection or current_app.extensions["redis"]
        try:
            with connection.pipeline(transaction=False) as pipe:
                for name, labels, amount in self.counters:
                    key = _field(name, _ordered(name, labels, COUNTERS))
                    if float(amount).is_integer():
                        pipe.hincrby(COUNTERS_KEY, key, int(amount))
                    else:
                        pipe.hincrbyfloat(COUNTERS_KEY, key, amount)
                for name, labels, value in self.observations:
                    spec, ordered = HISTOGRAMS[name], _ordered(name, labels, HISTOGRAMS)
                    # Each observation counts in its own bucket only; the collector adds them up.
                    bucket = next((str(b) for b in spec.buckets if value <= b), "+Inf")
                    pipe.hincrby(HISTOGRAMS_KEY, _field(name, ordered, bucket), 1)
                    pipe.hincrbyfloat(HISTOGRAMS_KEY, _field(name, ordered, "sum"), value)
                pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("metrics not recorded: Redis unavailable (%s)", type(exc).__name__)


def _ordered(name: str, labels: dict, specs: dict) -> list[str]:
    return [str(labels[label]) for label in specs[name].labels]


def submitted(model: str) -> None:
    """Count a submission (called by the web process after the task is committed)."""
    Batch().inc("atr_tasks_submitted", model=model).send()


class AppCollector:
    """Builds every metric family at scrape time, inside the app context of the request."""

    def __init__(self, connection: Redis):
        self.connection = connection

    def collect(self) -> Iterator[Metric]:
        yield from self._status_gauges()
        yield from self._webhook_gauges()
        yield from self._redis_families()

    def _status_gauges(self) -> Iterator[Metric]:
        from .services.stats import status_counts

        gauge = GaugeMetricFamily("atr_tasks", "Tasks in the database by status, now.", labels=["status"])
        for status, count in status_counts(self.connection).items():
            gauge.add_metric([status], count)
        yield gauge

    def _webhook_gauges(self) -> Iterator[Metric]:
        from .services.outbox import oldest_pending_age

        gauge = GaugeMetricFamily(
            "atr_webhook_oldest_undelivered_seconds", "Age of the oldest webhook event not delivered yet (0: none)."
        )
        gauge.add_metric([], oldest_pending_age())
        yield gauge

    def _redis_families(self) -> Iterator[Metric]:
        from .services.stats import queue_depths, workers_online

        try:
            counters = self.connection.hgetall(COUNTERS_KEY)
            histograms = self.connection.hgetall(HISTOGRAMS_KEY)
            depths = queue_depths(self.connection)
            workers = workers_online(self.connection)
        except (RedisError, OSError):
            up = GaugeMetricFamily("atr_redis_up", "Whether Redis answered this scrape.")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("atr_redis_up", "Whether Redis answered this scrape.")
        up.add_metric([], 1)
        yield up

        depth = GaugeMetricFamily("atr_queue_depth", "Jobs waiting in each queue.", labels=["queue"])
        scheduled = GaugeMetricFamily(
            "atr_queue_scheduled", "Jobs scheduled for later (retry backoff) per queue.", labels=["queue"]
        )
        for row in depths:
            depth.add_metric([row.name], row.queued)
            scheduled.add_metric([row.name], row.scheduled)
        yield depth
        yield scheduled
        online = GaugeMetricFamily("atr_workers", "RQ workers alive (heartbeating).")
        online.add_metric([], workers)
        yield online

        values: dict[str, dict[tuple, float]] = defaultdict(dict)
        for raw, value in counters.items():
            try:
                name, labels = json.loads(raw)
            except ValueError:
                continue
            if name in COUNTERS:
                values[name][tuple(labels)] = float(value)
        for name, spec in COUNTERS.items():
            family = CounterMetricFamily(name, spec.help, labels=list(spec.labels))
            for labels, value in sorted(values[name].items()):
                family.add_metric(list(labels), value)
            yield family

        buckets: dict[str, dict[tuple, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
        for raw, value in histograms.items():
            try:
                name, labels, part = json.loads(raw)
            except ValueError:
                continue
            if name in HISTOGRAMS:
                buckets[name][tuple(labels)][part] = float(value)
        for name, spec in HISTOGRAMS.items():
            family = HistogramMetricFamily(name, spec.help, labels=list(spec.labels))
            for labels, parts in sorted(buckets[name].items()):
                running, cumulative = 0.0, []
                for bound in (*(str(b) for b in spec.buckets), "+Inf"):
                    running += parts.get(bound, 0.0)
                    cumulative.append((_le(bound), running))
                family.add_metric(list(labels), cumulative, sum_value=parts.get("sum", 0.0))
            yield family


def _le(bound: str) -> str:
    return bound if bound == "+Inf" else repr(float(bound))


bp = Blueprint("metrics", __name__)


def _check_access() -> None:
    """Let in an admin session or the METRICS_TOKEN bearer; 404 when metrics are off."""
    config = current_app.config
    if not config["METRICS_ENABLED"]:
        raise NotFoundError("Metrics are turned off on this server (METRICS_ENABLED=false).")
    token = bearer_token()
    expected = config.get("METRICS_TOKEN")
    if token is not None:
        if expected and hmac.compare_digest(token.encode(), expected.encode()):
            return
        raise AuthError("The metrics token is not valid.")
    if not current_user.is_authenticated:
        raise AuthError("Metrics need an admin session or `Authorization: Bearer <METRICS_TOKEN>`.")
    if not current_user.is_admin:
        raise ForbiddenError("Metrics are for administrators.")


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text exposition of every metric (see the module docstring)."""
    _check_access()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AppCollector(current_app.extensions["redis"]))
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})
