"""Shared by bench.in_flight and bench.overhead: the fake provider, worker processes, memory, submission."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psycopg2
from redis import Redis
from rq import Worker
from rq.suspension import resume, suspend

from .common import DATABASE_URL, REDIS_URL, ROOT, env, flask


@contextmanager
def fake_provider():
    """Run tests/fake_provider.py in a process of its own; yield its base URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_provider", "0"], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env()
    )
    try:
        yield process.stdout.readline().split(" at ")[-1].strip()
    finally:
        process.terminate()
        process.wait(10)


def models_file(folder: Path, provider_url: str, concurrency: int) -> Path:
    path = folder / "models.toml"
    path.write_text(
        f"""
[models.fake]
base_url = "{provider_url}"
upstream = "fake"
max_tokens = 1024
default_max_tokens = 64
concurrency = {concurrency}
timeout = 60
read_timeout = 30
"""
    )
    return path


def rss_mib(pid: int) -> float:
    """Return the resident memory of a process and all its descendants, in MiB (Linux /proc)."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
            for path in Path(f"/proc/{current}/task").glob("*/children"):
                pending.extend(int(child) for child in path.read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


class Memory:
    """The peak, over samples, of the summed RSS of some processes (and their children)."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.peak = 0.0

    def sample(self) -> float:
        now = sum(rss_mib(pid) for pid in self.pids)
        self.peak = max(self.peak, now)
        return now


def start_workers(count: int, concurrency: int, extra_env: dict[str, str]) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "wsgi", "worker", "--concurrency", str(concurrency)],
            cwd=ROOT,
            env=env(LOG_LEVEL="WARNING", **extra_env),
            start_new_session=True,
        )
        for _ in range(count)
    ]


def stop_workers(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            os.killpg(worker.pid, 15)
    for worker in workers:
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, 9)


def wait_for_workers(count: int, timeout: float = 60) -> None:
    connection = Redis.from_url(REDIS_URL)
    deadline = time.monotonic() + timeout
    while Worker.count(connection=connection) < count:
        if time.monotonic() > deadline:
            raise RuntimeError("the workers did not start")
        time.sleep(0.2)


def submit_suspended(prompts: list[str], extra_env: dict[str, str]) -> float:
    """Submit tasks through the service layer while workers are suspended; return the seconds it took."""
    suspend(Redis.from_url(REDIS_URL))
    script = (
        "import sys, time\n"
        "from wsgi import app\n"
        "from webapp.services import accounts, tasks\n"
        "from webapp.services.tasks import Submission\n"
        "prompts = sys.stdin.read().split('\\x00')\n"
        "with app.app_context():\n"
        "    user = accounts.find_user('bench')\n"
        "    start = time.perf_counter()\n"
        "    for prompt in prompts:\n"
        "        tasks.submit(user, Submission(prompt, 'fake', 5, {'max_tokens': 64}))\n"
        "    print(time.perf_counter() - start)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env(**extra_env),
        input="\x00".join(prompts),
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.strip().splitlines()[-1])


def release_and_wait(count: int, memory: Memory, timeout: float) -> float:
    """Resume the workers; return the seconds until `count` tasks are COMPLETED (sampling memory)."""
    conn = psycopg2.connect(DATABASE_URL)
    conn.autocommit = True
    start = time.perf_counter()
    resume(Redis.from_url(REDIS_URL))
    with conn.cursor() as cur:
        while True:
            memory.sample()
            cur.execute("SELECT count(*) FROM tasks WHERE status = 'COMPLETED'")
            if cur.fetchone()[0] >= count:
                break
            if time.perf_counter() - start > timeout:
                cur.execute("SELECT status, count(*) FROM tasks GROUP BY status")
                raise RuntimeError(f"not finished after {timeout} s: {cur.fetchall()}")
            time.sleep(0.1)
    seconds = time.perf_counter() - start
    conn.close()
    return seconds


def bench_user() -> None:
    flask("users", "create", "bench", "--password-stdin", stdin="bench-password\n")
