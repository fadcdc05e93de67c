"""How many calls in flight: 1,000 tasks, each a 2-s streamed answer (20 chunks), vs plain RQ.

Product: the tasks are submitted through the service layer while the workers are suspended
(`rq suspend`), then released at once; timed until every row is COMPLETED in PostgreSQL, with
the workers' memory (RSS of each worker process and its children, summed) sampled every 0.1 s.
Baseline: plain RQ SimpleWorkers (one job at a time each) running a job that streams the same
answer from the same fake provider with httpx, as many processes as fit in the same memory
budget; they run a slice of the batch and their rate is compared.

    .venv/bin/python -m bench.in_flight [PROCESSES THREADS]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.request
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
    rss_mib,
    start_workers,
    stop_workers,
    submit_suspended,
    wait_for_workers,
)

TASKS = 1000
CHUNKS, DELAY = 20, 0.1  # a 2-s answer
BUDGET_MIB = 512
BASELINE_TASKS = 100


def plain_job(provider_url: str, prompt: str) -> int:
    """The baseline's job: stream the same answer from the same provider, return its length."""
    import httpx2

    body = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    size = 0
    with httpx2.stream("POST", f"{provider_url}/chat/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            size += len(line)
    return size


def prompt(i: int) -> str:
    return f"#fake {json.dumps({'chunks': CHUNKS, 'delay': DELAY})}\nin flight {i}"


def baseline(provider_url: str) -> tuple[int, float, float]:
    """Run plain SimpleWorkers within the budget; return (processes, jobs/s, peak MiB)."""
    connection = Redis.from_url(REDIS_URL)
    queue = Queue("plain", connection=connection)

    def worker() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "rq.cli", "worker", "--burst", "-w", "rq.SimpleWorker", "-u", REDIS_URL, "-q"]
            + ["plain"],
            cwd=ROOT,
            env=env(),
        )

    # One worker first, to learn what one costs.
    queue.enqueue("bench.in_flight.plain_job", provider_url, prompt(-1))
    probe = worker()
    peak = 0.0
    while probe.poll() is None:
        peak = max(peak, rss_mib(probe.pid))
        time.sleep(0.05)
    processes = max(1, int(BUDGET_MIB // max(peak, 1)))
    for i in range(BASELINE_TASKS):
        queue.enqueue("bench.in_flight.plain_job", provider_url, prompt(i))
    start = time.perf_counter()
    workers = [worker() for _ in range(processes)]
    memory = Memory([w.pid for w in workers])
    while any(w.poll() is None for w in workers):
        memory.sample()
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    return processes, BASELINE_TASKS / seconds, memory.peak


def main() -> None:
    processes = int(sys.argv[1]) if len(sys.argv) > 2 else 2
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 500
    reset_database()
    bench_user()
    with fake_provider() as provider_url, tempfile.TemporaryDirectory() as folder:
        extra = {"MODELS_FILE": str(models_file(Path(folder), provider_url, TASKS)), "DEFAULT_MODEL": "fake"}
        submitted = submit_suspended([prompt(i) for i in range(TASKS)], extra)
        workers = start_workers(processes, threads, extra)
        try:
            wait_for_workers(processes)
            memory = Memory([w.pid for w in workers])
            idle = memory.sample()
            seconds = release_and_wait(TASKS, memory, timeout=170)
            with urllib.request.urlopen(provider_url.removesuffix("/v1") + "/_in_flight") as answer:
                most = json.load(answer)["max"].get("fake", 0)
        finally:
            stop_workers(workers)
        Redis.from_url(REDIS_URL).flushdb()
        base_processes, base_rate, base_peak = baseline(provider_url)
    rate = TASKS / seconds
    print(
        f"in flight: {TASKS:,} tasks, each a {CHUNKS * DELAY:g}-s streamed answer of {CHUNKS} chunks "
        f"from the fake provider; memory budget {BUDGET_MIB} MiB"
    )
    print(f"submitted through the service layer (workers suspended) in {submitted:.1f} s")
    print(f"{'':44}{'wall s':>8}{'tasks/s':>9}{'peak MiB':>10}")
    print(
        f"{'baseline: ' + str(base_processes) + ' RQ SimpleWorkers, ' + str(BASELINE_TASKS) + ' jobs':44}"
        f"{BASELINE_TASKS / base_rate:>8.1f}{base_rate:>9.1f}{base_peak:>10.0f}"
    )
    print(
        f"{'product: ' + str(processes) + ' workers x ' + str(threads) + ' threads, ' + str(TASKS) + ' tasks':44}"
        f"{seconds:>8.1f}{rate:>9.1f}{memory.peak:>10.0f}"
    )
    print(f"most calls the provider answered at once: {most}")
    print(f"worker memory when idle: {idle:.0f} MiB; at the peak: {memory.peak:.0f} MiB (RSS, summed with children)")
    goal = "met" if seconds <= 10 and memory.peak <= BUDGET_MIB else "missed"
    print(f"ratio product/baseline (tasks/s): {rate / base_rate:.1f}; goal (<= 10 s, <= {BUDGET_MIB} MiB): {goal}")


if __name__ == "__main__":
    main()
