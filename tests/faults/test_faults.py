"""The fault suite: real processes, real faults, and one invariant at the end of every case.

Every accepted task (a 202) ends in a finished state, written exactly once, and the provider saw
no more calls for it than it had attempts. Run with `make test-faults` (about 15 minutes); the
table of figures is printed at the end.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from tests.faults.cluster import FINISHED, Cluster, Outcome, verdict, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(1800)]


def prompt(case: str, i: int, **fake) -> str:
    """A task prompt telling the fake provider how to answer it (unique per task)."""
    return f"#fake {json.dumps(fake)}\n{case} task {i}"


def submit_in_background(cluster: Cluster, prompts: list[str], clients: int) -> tuple[threading.Thread, Outcome]:
    outcome = Outcome()

    def run():
        result = cluster.submit(prompts, clients=clients)
        outcome.accepted.update(result.accepted)
        outcome.unavailable += result.unavailable
        outcome.bad.extend(result.bad)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def busy_worker(cluster: Cluster, at_least: float = 0.3):
    """Return a worker that has been running tasks for `at_least` s (mid-stream)."""

    def find():
        return next((worker for worker in cluster.live_workers() if cluster.running(worker)), None)

    while True:
        worker = wait_until(find, 60, "a busy worker", interval=0.05)
        time.sleep(at_least)
        if worker.poll() is None and cluster.running(worker):
            return worker


def log_count(cluster: Cluster, words: str) -> int:
    return sum(path.read_text(errors="replace").count(words) for path in cluster.logs.glob("w-*.log"))


# --- 1. kill -9 ----------------------------------------------------------------------------


def test_kill_whole_workers_mid_stream(fresh, record):
    cluster = fresh
    started = time.monotonic()
    cluster.start_workers(4)
    cluster.start_monitor()
    # 4-s answers, four at once per worker: the batch outlasts the 20 kills (with 2-s answers
    # it once ended before the last kill, leaving no busy worker to kill).
    prompts = [prompt("kill", i, chunks=40, delay=0.1) for i in range(200)]
    submitter, outcome = submit_in_background(cluster, prompts, clients=4)
    for _ in range(20):
        worker = busy_worker(cluster)
        os.killpg(worker.pid, signal.SIGKILL)  # the worker, every task thread in it, its scheduler
        worker.wait()
        cluster.start_worker()  # as a supervisor (compose's restart policy) would
        time.sleep(0.5)
    submitter.join()
    cluster.wait_finished(list(outcome.accepted.values()), 180)
    report = verdict(cluster, "1. kill -9 (20 whole workers)", outcome, started)
    record(report)
    assert report.submitted == len(prompts)


# --- 2. Redis loses everything -------------------------------------------------------------


def test_flushall_with_tasks_queued_and_running(fresh, record):
    cluster = fresh
    started = time.monotonic()
    cluster.start_workers(4)
    cluster.start_monitor()
    prompts = [prompt("flush", i, chunks=20, delay=0.1) for i in range(104)]
    outcome = cluster.submit(prompts, clients=4)
    running = wait_until(
        lambda: (n := cluster.query("SELECT count(*) FROM tasks WHERE status = 'PROCESSING'")[0][0]) >= 4 and n,
        30,
        "four running tasks",
    )
    queued = cluster.query("SELECT count(*) FROM tasks WHERE status = 'PENDING'")[0][0]
    cluster.redis.client().flushall()
    cluster.wait_finished(list(outcome.accepted.values()), 180)
    record(verdict(cluster, "2a. FLUSHALL", outcome, started, f"{queued} queued, {running} running at the flush"))


def test_redis_killed_and_started_empty(fresh, record):
    cluster = fresh
    started = time.monotonic()
    cluster.start_workers(4)
    cluster.start_monitor()
    first = [prompt("redis", i, chunks=20, delay=0.1) for i in range(60)]
    outcome = cluster.submit(first, clients=4)
    wait_until(
        lambda: cluster.query("SELECT count(*) FROM tasks WHERE status = 'PROCESSING'")[0][0] >= 4, 30, "running"
    )
    cluster.redis.kill()
    # Submissions while Redis is down are accepted: the row is the record.
    during = cluster.submit([prompt("redis-down", i, chunks=5, delay=0.02) for i in range(20)], clients=2)
    time.sleep(3)
    cluster.redis.start()  # empty
    outcome.accepted.update(during.accepted)
    outcome.bad.extend(during.bad)
    cluster.wait_finished(list(outcome.accepted.values()), 180)
    record(verdict(cluster, "2b. Redis killed, started empty", outcome, started, "20 submitted while it was down"))


# --- 3. PostgreSQL goes away ---------------------------------------------------------------


def test_postgres_stopped_for_ten_seconds_during_a_burst(fresh, record):
    cluster = fresh
    started = time.monotonic()
    cluster.start_workers(4)
    cluster.start_monitor()
    prompts = [prompt("pg", i, chunks=20, delay=0.05) for i in range(300)]
    submitter, outcome = submit_in_background(cluster, prompts, clients=10)
    wait_until(lambda: cluster.query("SELECT count(*) FROM tasks")[0][0] >= 40, 30, "a burst under way")
    cluster.pg.stop()
    stopped = time.monotonic()
    time.sleep(10)
    cluster.pg.start()
    down = time.monotonic() - stopped
    submitter.join()
    cluster.wait_finished(list(outcome.accepted.values()), 240)
    report = verdict(
        cluster,
        "3. PostgreSQL stopped 10 s",
        outcome,
        started,
        f"down {down:.0f} s; {outcome.unavailable} submissions answered 503 (retried with their key)",
    )
    record(report)
    assert outcome.unavailable > 0  # the outage was seen, and answered with the envelope
    assert report.failed == 0  # nothing failed because the database blinked


# --- 4. provider storm ---------------------------------------------------------------------


def test_provider_storm(fresh, record):
    cluster = fresh
    started = time.monotonic()
    cluster.start_workers(4)
    cluster.start_monitor()
    storm = {"429": 0.3, "500": 0.2, "hang": 0.05}
    prompts = [
        prompt("storm", i, storm=storm, retry_after=1, hang_seconds=20, chunks=10, delay=0.02) for i in range(200)
    ]
    outcome = cluster.submit(prompts, clients=4)
    cluster.wait_finished(list(outcome.accepted.values()), 600)
    pauses = log_count(cluster, "paused (circuit open)")
    waits = log_count(cluster, "before the next attempt")
    report = verdict(
        cluster,
        "4. provider storm (30% 429, 20% 500, 5% hang)",
        outcome,
        started,
        f"{waits} short Retry-After waits in place; {pauses} deferrals by the circuit breaker",
    )
    record(report)


# --- 5. volume -----------------------------------------------------------------------------


def test_ten_thousand_tasks_from_twenty_clients(fresh, record):
    cluster = fresh
    started = time.monotonic()
    cluster.start_workers(6)
    cluster.start_monitor(interval=1.0)  # a sample reads every unfinished task: keep it light
    count = int(os.environ.get("FAULTS_VOLUME", "10000"))
    prompts = [prompt("volume", i, chunks=5, delay=0.01) for i in range(count)]
    outcome = cluster.submit(prompts, clients=20)
    submitted = time.monotonic() - started
    cluster.wait_finished(list(outcome.accepted.values()), 1500)
    record(
        verdict(
            cluster,
            f"5. {count:,} tasks, 20 clients",
            outcome,
            started,
            f"submitted in {submitted:.0f} s ({count / submitted:.0f}/s); ~50 ms answers; 6 workers",
        )
    )


# --- 6. SIGTERM ----------------------------------------------------------------------------


def test_sigterm_every_worker_mid_batch_then_start_again(fresh, record):
    cluster = fresh
    started = time.monotonic()
    cluster.start_workers(4)
    cluster.start_monitor()
    # Half finish within the 3 s grace period, half stream for 8 s and must be handed back.
    prompts = [prompt("term", i, chunks=20, delay=0.05 if i % 2 else 0.4) for i in range(60)]
    outcome = cluster.submit(prompts, clients=4)
    wait_until(lambda: all(cluster.running(w) for w in cluster.live_workers()), 30, "every worker busy")
    workers = cluster.live_workers()
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)  # what `docker compose stop` sends
    for worker in workers:
        worker.wait(30)  # grace (3 s) + margin; compose would SIGKILL at its stop_grace_period
    assert all(worker.returncode == 0 for worker in workers), [w.returncode for w in workers]
    handed_back = cluster.query(
        "SELECT count(DISTINCT task_id) FROM fault_audit WHERE old_status = 'PROCESSING' AND new_status = 'PENDING'"
    )[0][0]
    time.sleep(1)
    cluster.workers.clear()
    cluster.start_workers(4)
    cluster.wait_finished(list(outcome.accepted.values()), 180)
    report = verdict(
        cluster, "6. SIGTERM to every worker mid-batch", outcome, started, f"{handed_back} tasks handed back"
    )
    record(report)
    assert handed_back > 0
    assert report.failed == 0


# --- 7. Idempotency-Key races --------------------------------------------------------------


def test_same_idempotency_key_from_ten_clients_at_once(fresh, record):
    cluster = fresh
    started = time.monotonic()
    cluster.start_workers(2)
    cluster.start_monitor()
    outcome = Outcome()
    conflicts = 0
    for key in range(20):
        body = {"prompt": prompt("idem", key, chunks=3)}
        barrier = threading.Barrier(10)
        answers: list = []

        def race(body=body, barrier=barrier, answers=answers, key=key):
            with cluster.client() as http:
                barrier.wait()
                answers.append(http.post("/tasks", json=body, headers={"Idempotency-Key": f"race-{key}"}))

        threads = [threading.Thread(target=race) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [a.status_code for a in answers] == [202] * 10, [a.text for a in answers if a.status_code != 202]
        ids = {a.json()["id"] for a in answers}
        assert len(ids) == 1, ids  # one task, whoever won the race
        outcome.accepted[body["prompt"]] = ids.pop()
        with cluster.client() as http:
            other = http.post("/tasks", json={"prompt": "another body"}, headers={"Idempotency-Key": f"race-{key}"})
        assert other.status_code == 422 and other.json()["error"]["code"] == "validation_error"
        conflicts += 1
    cluster.wait_finished(list(outcome.accepted.values()), 60)
    statuses = cluster.query("SELECT status FROM tasks")
    assert len(statuses) == 20 and all(s in FINISHED for (s,) in statuses)
    record(
        verdict(
            cluster,
            "7. one Idempotency-Key, 10 clients at once (x20)",
            outcome,
            started,
            f"200 requests, 20 tasks; {conflicts} different bodies refused with 422",
        )
    )
