"""Redis and the RQ queues. Redis only wakes workers up: a job carries a task id, nothing else."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Protocol

from flask import current_app
from redis import BlockingConnectionPool, Redis
from redis.client import Pipeline
from rq import Queue, Worker
from rq.serializers import JSONSerializer
from rq.worker_registration import unregister

QUEUE_NAMES = ("high", "default", "low")
# How long RQ keeps a finished job's (empty) result and a failed job's record.
RESULT_TTL = 600
FAILURE_TTL = 7 * 24 * 3600
# Workers beat every 10 s (jobs/worker.py). One silent this long died without unregistering (it
# was killed, or Redis went before it): RQ would list it until its key expires, ~8 minutes.
WORKER_SILENT_SECONDS = 60


def queue_name(priority: int) -> str:
    """Return the queue for a priority: high 8-10, default 4-7, low 1-3."""
    if priority >= 8:
        return "high"
    if priority >= 4:
        return "default"
    return "low"


def connect(url: str, max_connections: int | None = None) -> Redis:
    """Return a client that connects lazily, with short timeouts so a dead Redis fails fast.

    With `max_connections` (a worker: its threads plus a few), a caller past the limit waits
    for a connection rather than fail: redis-py's default pool refuses a 101st connection,
    which the model limits would take for Redis being down.
    """
    options = dict(socket_connect_timeout=2, socket_timeout=5, health_check_interval=30)
    if max_connections is None:
        return Redis.from_url(url, **options)
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=5, **options)
    return Redis(connection_pool=pool)


def redis() -> Redis:
    """Return the app's Redis client (connections are made on first use)."""
    return current_app.extensions["redis"]


def get_queue(name: str, connection: Redis | None = None) -> Queue:
    return Queue(name, connection=connection or redis(), serializer=JSONSerializer)


def new_job_id(task_id: int) -> str:
    """Return a fresh RQ job id for a task; operators can read the task id in rq-dashboard."""
    return f"task-{task_id}-{secrets.token_hex(4)}"


class Rider(Protocol):
    """Redis commands sent in the same round trip as an enqueue (a submission's metrics)."""

    def queue_on(self, pipeline: Pipeline) -> None: ...


def enqueue_task(
    task_id: int,
    priority: int,
    job_timeout: int,
    delay: float = 0,
    job_id: str | None = None,
    at_front: bool = False,
    also: Rider | None = None,
) -> str:
    """Enqueue `jobs.run_task(task_id)` on the queue for `priority`; return the job id.

    `at_front` is for a task whose turn has come after waiting in its model's line. The job
    and `also`'s commands go to Redis in one round trip.

    With a delay the job waits in RQ's scheduled registry (a worker's scheduler moves it; the
    sweeper moves it if it is overdue, see `jobs.sweeper`).
    """
    queue = get_queue(queue_name(priority))
    job_id = job_id or new_job_id(task_id)
    options = dict(
        job_id=job_id,
        job_timeout=job_timeout,
        result_ttl=RESULT_TTL,
        failure_ttl=FAILURE_TTL,
        description=f"task {task_id}",
    )
    with queue.connection.pipeline() as pipe:
        if delay > 0:
            queue.enqueue_in(timedelta(seconds=delay), "jobs.run_task.run_task", task_id, pipeline=pipe, **options)
        else:
            queue.enqueue("jobs.run_task.run_task", task_id, at_front=at_front, pipeline=pipe, **options)
        if also is not None:
            also.queue_on(pipe)
        pipe.execute()
    return job_id


def enqueue_tasks(jobs: list[tuple[int, str]], priority: int, job_timeout: int, per_pipeline: int = 1000) -> None:
    """Enqueue `jobs.run_task` for many committed tasks, (task id, job id) each, a pipeline per `per_pipeline`."""
    queue = get_queue(queue_name(priority))
    for start in range(0, len(jobs), per_pipeline):
        datas = [
            Queue.prepare_data(
                "jobs.run_task.run_task",
                args=(task_id,),
                timeout=job_timeout,
                result_ttl=RESULT_TTL,
                failure_ttl=FAILURE_TTL,
                description=f"task {task_id}",
                job_id=job_id,
            )
            for task_id, job_id in jobs[start : start + per_pipeline]
        ]
        with queue.connection.pipeline() as pipe:
            queue.enqueue_many(datas, pipeline=pipe)
            pipe.execute()


def enqueue_call(function: str, *args, queue: str = "high", job_id: str | None = None, timeout: int = 600) -> str:
    """Enqueue a bookkeeping job (a batch's intake or finalizing) by the function's dotted name; return its id."""
    job = get_queue(queue).enqueue(
        function, *args, job_id=job_id, job_timeout=timeout, result_ttl=RESULT_TTL, failure_ttl=FAILURE_TTL
    )
    return job.id


def _silent(worker: Worker, now: datetime) -> bool:
    beat = worker.last_heartbeat or worker.birth_date
    return beat is None or (now - beat.replace(tzinfo=beat.tzinfo or UTC)).total_seconds() > WORKER_SILENT_SECONDS


def live_workers(connection: Redis) -> list[Worker]:
    """Return the registered workers that have beaten lately: what health, /admin and metrics count."""
    now = datetime.now(UTC)
    return [worker for worker in Worker.all(connection=connection) if not _silent(worker, now)]


def forget_dead_workers(connection: Redis) -> list[str]:
    """Unregister workers silent for WORKER_SILENT_SECONDS, so rq-dashboard stops listing them too.

    A worker that was only cut off from Redis registers itself again at its next heartbeat
    (it finds its key gone), so nothing alive stays forgotten.
    """
    now = datetime.now(UTC)
    dead = [worker for worker in Worker.all(connection=connection) if _silent(worker, now)]
    for worker in dead:
        with connection.pipeline() as pipeline:
            unregister(worker, pipeline)
            pipeline.delete(worker.key)
            pipeline.execute()
    return [worker.name for worker in dead]
