"""The concurrent worker: many tasks in one process, shared model limits, stopping, dying, RQ's books."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from rq import Queue, Worker
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException

from jobs.limits import model_limits
from jobs.sweeper import sweep
from jobs.worker import TaskWorker, WatchdogDeathPenalty, make_worker, watchdog
from tests.helpers import ROOT, redis_conn, task_row, wait_for, work
from webapp.lifecycle import attempts
from webapp.queues import QUEUE_NAMES


def fake(chunks: int, delay: float, text: str) -> str:
    """A prompt that tells the fake provider how to answer (it works across processes)."""
    return f"#fake {json.dumps({'chunks': chunks, 'delay': delay})}\n{text}"


def start_worker(test_env: dict, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "wsgi", "worker", *args],
        cwd=ROOT,
        env={**test_env, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its process group: the worker and the RQ scheduler it may fork
    )


def stop(process: subprocess.Popen, timeout: float = 30) -> str:
    """SIGTERM a worker; return its output once it has exited (0)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def started_jobs() -> list[str]:
    connection = redis_conn()
    return [
        job_id
        for name in QUEUE_NAMES
        for job_id in StartedJobRegistry(name, connection=connection, serializer=JSONSerializer).get_job_ids()
    ]


def statuses(api, tasks: list[dict]) -> list[str]:
    return [api.task(task["id"])["status"] for task in tasks]


def test_one_worker_process_runs_many_tasks_at_once(app, api, fake_provider, test_env):
    tasks = [api.submit(fake(10, 0.1, f"wide {i}"), model="fake-wide") for i in range(50)]
    done = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "worker", "--burst", "--concurrency", "50"],
        cwd=ROOT,
        env=test_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert statuses(api, tasks) == ["COMPLETED"] * 50
    # Each answer takes a second; one process had (nearly) all of them in flight at once.
    assert fake_provider.max_in_flight["fake-wide"] >= 25, dict(fake_provider.max_in_flight)
    # RQ's books are clean: nothing left started, every job finished, the worker gone.
    connection = redis_conn()
    assert started_jobs() == []
    finished = FinishedJobRegistry("default", connection=connection, serializer=JSONSerializer)
    assert len(finished.get_job_ids()) == 50
    assert Worker.count(connection=connection) == 0


def test_model_concurrency_holds_across_two_worker_processes(app, api, fake_provider, test_env):
    tasks = [api.submit(fake(5, 0.1, f"narrow {i}"), model="fake-narrow") for i in range(12)]
    workers = [start_worker(test_env, "--concurrency", "8") for _ in range(2)]
    try:
        wait_for(lambda: Worker.count(connection=redis_conn()) == 2, timeout=30)
        wait_for(lambda: statuses(api, tasks) == ["COMPLETED"] * 12, timeout=90, interval=0.2)
    finally:
        outputs = [stop(worker) for worker in workers]
    assert fake_provider.max_in_flight["fake-narrow"] <= 3, dict(fake_provider.max_in_flight)
    assert all(api.task(task["id"])["attempts"] == 1 for task in tasks)  # waiting spent no attempt
    assert any("concurrency limit" in output for output in outputs)  # some did wait
    assert started_jobs() == []
    assert Worker.count(connection=redis_conn()) == 0
    with app.app_context():
        assert model_limits().in_flight("fake-narrow") == 0


def test_every_thread_of_a_wide_worker_can_reach_redis_at_once(app):
    """The app's Redis client in a worker has a connection for each thread (redis-py's default: 100)."""
    from webapp.queues import redis

    errors: list[BaseException] = []
    with app.app_context():
        make_worker(list(QUEUE_NAMES), concurrency=150)
        connection = redis()
        start = threading.Barrier(150)

        def hold_a_connection() -> None:
            start.wait()
            try:
                connection.blpop(["atr:test:nothing"], timeout=0.5)  # each holds a connection 0.5 s
            except Exception as exc:  # noqa: BLE001 (collected for the assertion)
                errors.append(exc)

        threads = [threading.Thread(target=hold_a_connection) for _ in range(150)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    assert errors == []


def test_an_rpm_limit_defers_instead_of_failing(app, api, fake_provider):
    first = api.submit("first this minute", model="fake-rpm")
    second = api.submit("second this minute", model="fake-rpm")
    work(app, scheduled=False)
    assert api.task(first["id"])["status"] == "COMPLETED"
    row = task_row(app, second["id"])
    assert row.status == "PENDING" and row.attempts == 0 and row.run_after is not None
    assert fake_provider.calls_for("second this minute") == []
    scheduled = Queue("default", connection=redis_conn(), serializer=JSONSerializer).scheduled_job_registry
    assert scheduled.get_job_ids() == [row.job_id]


def test_cancelling_a_task_running_in_a_threaded_worker(app, api, fake_provider, test_env):
    prompt = fake(100, 0.1, "cancel me")
    task = api.submit(prompt)
    worker = start_worker(test_env, "--concurrency", "4")
    try:
        wait_for(lambda: api.task(task["id"])["result"], timeout=30)
        assert api.post(f"/tasks/{task['id']}/cancel").status_code == 200
        wait_for(lambda: (calls := fake_provider.calls_for(prompt)) and calls[0].disconnected, timeout=10)
    finally:
        output = stop(worker)
    assert api.task(task["id"])["status"] == "CANCELLED"
    assert fake_provider.calls_for(prompt)[0].chunks_sent < 100
    assert "stopped" in output and started_jobs() == []


def test_sigterm_drains_then_hands_back_refunded(app, api, fake_provider, test_env):
    quick = api.submit(fake(5, 0.1, "finishes within the grace"))
    slow = [api.submit(fake(100, 0.2, f"outlives the grace {i}")) for i in range(3)]
    worker = start_worker(test_env, "--concurrency", "8", SHUTDOWN_GRACE_SECONDS="1.5")
    wait_for(lambda: all(api.task(t["id"])["result"] for t in slow), timeout=30)
    output = stop(worker, timeout=20)
    assert api.task(quick["id"])["status"] == "COMPLETED"
    for task in slow:
        row = task_row(app, task["id"])
        assert row.status == "PENDING" and row.error_kind == "shutdown", output[-2000:]
        assert row.attempts == 1 and row.max_attempts == 4  # refunded
    queued = Queue("default", connection=redis_conn(), serializer=JSONSerializer).get_job_ids()
    assert sorted(queued) == sorted(task_row(app, t["id"]).job_id for t in slow)
    assert started_jobs() == [] and Worker.count(connection=redis_conn()) == 0


def test_a_killed_worker_tasks_come_back_through_the_sweeper(app, api, fake_provider, test_env):
    tasks = [api.submit(fake(100, 0.2, f"killed mid-answer {i}")) for i in range(3)]
    worker = start_worker(test_env, "--concurrency", "4", LEASE_SECONDS="2")
    try:
        wait_for(lambda: all(api.task(t["id"])["result"] for t in tasks), timeout=30)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.communicate()
    time.sleep(2.5)  # the leases run out: nobody renews them
    with app.app_context():
        report = sweep()
    assert sorted(report.reclaimed) == sorted(t["id"] for t in tasks)
    for task in tasks:
        row = task_row(app, task["id"])
        assert row.status == "PENDING" and row.attempts == 1


def test_a_refused_attempt_is_one_log_line_not_a_traceback(app, api, fake_provider, caplog):
    """The provider's refusal is logged by the task's events; RQ's traceback of the bookkeeping error is not."""
    fake_provider.script("refused outright", {"status": 400})
    task = api.submit("refused outright")
    caplog.set_level("INFO")
    with app.app_context():
        make_worker(QUEUE_NAMES, concurrency=2).work(burst=True, with_scheduler=False, logging_level="INFO")
    assert task_row(app, task["id"]).status == "FAILED"
    assert f"task {task['id']} job " in caplog.text and "failed (invalid_request)" in caplog.text
    assert "attempt failed (task" in caplog.text
    assert "Traceback" not in caplog.text and "exception raised while executing" not in caplog.text
    assert started_jobs() == []


def test_a_dead_thread_hands_its_task_back(app, api, monkeypatch, caplog):
    task = api.submit("in a thread that dies")
    perform_job = TaskWorker.perform_job
    deaths = []

    def dies_once(self, job, queue, execution):
        """The first job thread dies after its claim, outside of the job's own error handling."""
        if deaths:
            return perform_job(self, job, queue, execution)
        deaths.append(job.id)
        attempts.claim(int(job.args[0]), job.id)
        raise SystemError("the thread dies")

    monkeypatch.setattr(TaskWorker, "perform_job", dies_once)
    with app.app_context():
        make_worker(QUEUE_NAMES, concurrency=2).work(burst=True, with_scheduler=False, logging_level="WARNING")
    # Handed back at once (not after the lease), with a new job that the same burst then ran.
    row = task_row(app, task["id"])
    assert row.status == "COMPLETED" and row.attempts == 2 and row.job_id != deaths[0]
    assert f"task {task['id']} job {deaths[0]}: worker_lost" in caplog.text
    assert started_jobs() == []


def test_the_watchdog_interrupts_a_thread_past_its_time_limit():
    outcome = []

    def job():
        try:
            with WatchdogDeathPenalty(0.2, JobTimeoutException):
                for _ in range(200):
                    time.sleep(0.02)
            outcome.append("ran to the end")
        except JobTimeoutException:
            outcome.append("interrupted")

    thread = threading.Thread(target=job)
    thread.start()
    while thread.is_alive():
        watchdog.check()  # the worker's monitor thread does this every second
        time.sleep(0.05)
    assert outcome == ["interrupted"]


@pytest.mark.parametrize("flag", ["--concurrency=0", "--concurrency=x"])
def test_concurrency_must_be_a_positive_number(test_env, flag):
    done = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "worker", "--burst", flag],
        cwd=ROOT,
        env=test_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "concurrency" in done.stderr.lower()
