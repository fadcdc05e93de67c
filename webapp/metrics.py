"""The metrics workers and the web process write: counters and histograms kept in Redis.

Workers run in other processes (other containers) than the web process that serves /metrics,
so in-process counters would show only what one process saw. Instead each event is one
pipelined round trip of HINCRBY / HINCRBYFLOAT on two hashes, from whichever process saw it
(jobs/events.py, task submission). `webapp/metrics_collector.py` reads them back at scrape
time. If Redis loses its data the counters start again from zero, which Prometheus reads as a
counter reset.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from flask import current_app
from redis import Redis
from redis.exceptions import RedisError

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
        Spec("atr_cost_usd", "US dollars answers cost, at the prices of the model that answered.", ("model",)),
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
            "atr_task_fallbacks",
            "Tasks moved on from a model to the next of its fallback chain, by why the model was unavailable.",
            ("model", "to", "kind"),
        ),
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

    def submitted(self, model: str) -> Batch:
        """Count a submission (sent after the commit, with its job: `queue_on`)."""
        return self.inc("atr_tasks_submitted", model=model)

    def send(self, connection: Redis | None = None) -> None:
        """Write the updates; a Redis outage loses them and is logged, never raised."""
        if not self.counters and not self.observations:
            return
        connection = connection or current_app.extensions["redis"]
        try:
            with connection.pipeline(transaction=False) as pipe:
                self.queue_on(pipe)
                pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("metrics not recorded: Redis unavailable (%s)", type(exc).__name__)

    def queue_on(self, pipe) -> None:
        """Add the updates to a pipeline the caller executes (one round trip with its other commands)."""
        for name, labels, amount in self.counters:
            key = _field(name, _ordered(name, labels, COUNTERS))
            # Whole numbers only for whole-number counters: a float counter (dollars)
            # may hold a fraction already, which HINCRBY would refuse.
            if isinstance(amount, int):
                pipe.hincrby(COUNTERS_KEY, key, int(amount))
            else:
                pipe.hincrbyfloat(COUNTERS_KEY, key, amount)
        for name, labels, value in self.observations:
            spec, ordered = HISTOGRAMS[name], _ordered(name, labels, HISTOGRAMS)
            # Each observation counts in its own bucket only; the collector adds them up.
            bucket = next((str(b) for b in spec.buckets if value <= b), "+Inf")
            pipe.hincrby(HISTOGRAMS_KEY, _field(name, ordered, bucket), 1)
            pipe.hincrbyfloat(HISTOGRAMS_KEY, _field(name, ordered, "sum"), value)


def _ordered(name: str, labels: dict, specs: dict) -> list[str]:
    return [str(labels[label]) for label in specs[name].labels]
