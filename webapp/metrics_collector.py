"""The Prometheus collector behind /metrics: every metric family, built at scrape time.

Counters and histograms are read from the Redis hashes every process writes
(`webapp/metrics.py`); gauges are computed now: tasks by status from PostgreSQL, queue depths
and workers from Redis.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from redis import Redis
from redis.exceptions import RedisError

from .metrics import COUNTERS, COUNTERS_KEY, HISTOGRAMS, HISTOGRAMS_KEY
from .services.stats import queue_depths, status_counts, workers_online


class AppCollector:
    """Builds every metric family at scrape time, inside the app context of the request."""

    def __init__(self, connection: Redis):
        self.connection = connection

    def collect(self) -> Iterator[Metric]:
        yield from self._status_gauges()
        yield from self._webhook_gauges()
        yield from self._redis_families()

    def _status_gauges(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("atr_tasks", "Tasks in the database by status, now.", labels=["status"])
        for status, count in status_counts(self.connection).items():
            gauge.add_metric([status], count)
        yield gauge

    def _webhook_gauges(self) -> Iterator[Metric]:
        from .outbox import oldest_pending_age

        gauge = GaugeMetricFamily(
            "atr_webhook_oldest_undelivered_seconds", "Age of the oldest webhook event not delivered yet (0: none)."
        )
        gauge.add_metric([], oldest_pending_age())
        yield gauge

    def _redis_families(self) -> Iterator[Metric]:
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
