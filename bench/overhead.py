"""What the product adds per task: 5,000 instant tasks end to end vs bare RQ no-op jobs.

Product: 5,000 tasks whose answer is one chunk at once from the fake provider, submitted through
the service layer while the worker is suspended, then released; timed from the release until
every row is COMPLETED in PostgreSQL (claim, limits, provider call, final write, RQ's books).
Baseline: 5,000 no-op jobs run by one bare RQ SimpleWorker (burst), in the same Redis.

    .venv/bin/python -m bench.overhead [PROCESSES THREADS]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from redis import Redis
from rq import Queue

from .common import REDIS_URL, ROOT, env, reset_database
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

TASKS = 5000


def noop() -> None:
    """The baseline's job: nothing."""


def baseline() -> float:
    """Return the no-op jobs per second of one bare SimpleWorker."""
    connection = Redis.from_url(REDIS_URL)
    queue = Queue("noop", connection=connection)
    with connection.pipeline() as pipe:
        for _ in range(TASKS):
            queue.enqueue("bench.overhead.noop", pipeline=pipe)
        pipe.execute()
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "rq.cli", "worker", "--burst", "-w", "rq.SimpleWorker", "-u", REDIS_URL, "-q", "noop"],
        cwd=ROOT,
        env=env(),
        check=True,
    )
    return TASKS / (time.perf_counter() - start)


def main() -> None:
    processes = int(sys.argv[1]) if len(sys.argv) > 2 else 1
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    reset_database()
    bench_user()
    prompt = "#fake " + json.dumps({"chunks": 1})
    with fake_provider() as provider_url, tempfile.TemporaryDirectory() as folder:
        extra = {"MODELS_FILE": str(models_file(Path(folder), provider_url, 1000)), "DEFAULT_MODEL": "fake"}
        submitted = submit_suspended([f"{prompt}\ninstant {i}" for i in range(TASKS)], extra)
        workers = start_workers(processes, threads, extra)
        try:
            wait_for_workers(processes)
            seconds = release_and_wait(TASKS, Memory([w.pid for w in workers]), timeout=170)
        finally:
            stop_workers(workers)
    Redis.from_url(REDIS_URL).flushdb()
    base_rate = baseline()
    rate = TASKS / seconds
    print(f"overhead: {TASKS:,} instant tasks (a one-chunk answer from the fake provider), end to end")
    print(f"submitted through the service layer (worker suspended) in {submitted:.1f} s ({TASKS / submitted:.0f}/s)")
    print(f"baseline: bare RQ SimpleWorker, {TASKS:,} no-op jobs: {base_rate:8.0f} jobs/s")
    print(f"product: {processes} worker(s) x {threads} threads, release -> COMPLETED: {rate:8.0f} tasks/s", end="")
    print(f" ({seconds:.1f} s)")
    print(f"ratio product/baseline: {rate / base_rate:.2f}  (goal >= 0.5)")


if __name__ == "__main__":
    main()
