"""A backlog behind a model's concurrency limit: what waiting costs while only `limit` calls run.

Product: TASKS tasks of ~0.5-s answers for a model with `concurrency = LIMIT`, one worker with
32 threads (the default): LIMIT calls run, the rest of the backlog waits for a slot.
Baseline: the same tasks and limit, one worker with LIMIT threads, so no task ever meets the
limit (the queue itself is the wait: nothing is deferred, nothing polls).
Measured for both: wall time from release to the last COMPLETED, the worker's CPU seconds, the
jobs that joined the model's line (`atr_tasks_waited`) or were deferred on a timer
(`atr_tasks_deferred`), and the order tasks started in (the largest number of tasks submitted
later that started before one).

    .venv/bin/python -m bench.limited
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import psycopg2
from redis import Redis

from webapp.metrics import COUNTERS_KEY

from .common import DATABASE_URL, REDIS_URL, reset_database
from .workers import (
    Memory,
    bench_user,
    fake_provider,
    models_file,
    release_and_wait,
    start_workers,
    stop_workers,
    submit_suspended,
    wait_for_workers,
)

TASKS = 60
LIMIT = 2
PROMPT = "#fake " + json.dumps({"chunks": 10, "delay": 0.05})  # ~0.5 s an answer


def cpu_seconds(pid: int) -> float:
    """Return a live process's user + system CPU time (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def overtaken(order: list[int]) -> int:
    """Return the most tasks submitted later that started before one task."""
    worst = 0
    for position, task_id in enumerate(order):
        worst = max(worst, sum(1 for other in order[:position] if other > task_id))
    return worst


def run(threads: int) -> dict[str, float]:
    reset_database()
    bench_user()
    with fake_provider() as provider_url, tempfile.TemporaryDirectory() as folder:
        extra = {"MODELS_FILE": str(models_file(Path(folder), provider_url, LIMIT)), "DEFAULT_MODEL": "fake"}
        submit_suspended([f"{PROMPT}\nlimited {i}" for i in range(TASKS)], extra)
        workers = start_workers(1, threads, extra)
        try:
            wait_for_workers(1)
            before = cpu_seconds(workers[0].pid)
            seconds = release_and_wait(TASKS, Memory([w.pid for w in workers]), timeout=600)
            cpu = cpu_seconds(workers[0].pid) - before
        finally:
            stop_workers(workers)
    counters = Redis.from_url(REDIS_URL).hgetall(COUNTERS_KEY)

    def counted(name: str) -> int:
        return sum(int(value) for key, value in counters.items() if key.startswith(f'["{name}"'.encode()))

    conn = psycopg2.connect(DATABASE_URL)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM tasks ORDER BY started_at, id")
        order = [row[0] for row in cur.fetchall()]
    conn.close()
    return {
        "seconds": seconds,
        "cpu": cpu,
        "deferred": counted("atr_tasks_deferred"),
        "waited": counted("atr_tasks_waited"),
        "overtaken": overtaken(order),
    }


def main() -> None:
    base = run(LIMIT)
    product = run(32)
    print(f"limited: {TASKS} tasks of ~0.5-s answers, model concurrency {LIMIT} (ideal {TASKS * 0.5 / LIMIT:.0f} s)")
    for name, threads, figures in (("baseline", LIMIT, base), ("product", 32, product)):
        print(
            f"{name:8}: 1 worker x {threads:2} threads: {figures['seconds']:5.1f} s, "
            f"worker CPU {figures['cpu']:5.2f} s, "
            f"{figures['waited']:3d} waited in line, {figures['deferred']:4d} deferrals, "
            f"worst overtaking {figures['overtaken']}"
        )
    print(
        f"ratio product/baseline: wall time {product['seconds'] / base['seconds']:.2f}, "
        f"worker CPU {product['cpu'] / max(base['cpu'], 0.01):.2f}  (goal: wall time <= 1.1)"
    )


if __name__ == "__main__":
    main()
