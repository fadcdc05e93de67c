"""A task's jobs: the time limit of one attempt, and enqueueing after the commit or leaving it to the sweeper.

PostgreSQL is the record and Redis only wakes workers up, so an enqueue that fails (Redis is
down) is never an error: the row is committed PENDING, and the sweeper (`jobs/sweeper.py`)
enqueues every PENDING task no queue holds. `enqueue` is the one place that decides so.
"""

from __future__ import annotations

import logging

from redis.exceptions import RedisError
from rq.exceptions import NoSuchJobError
from rq.job import Job

from ..catalog import catalog
from ..queues import Rider, enqueue_task, redis

log = logging.getLogger(__name__)

# The time limit of a task whose model left the catalog (the attempt fails at once anyway).
DEFAULT_MODEL_TIMEOUT = 300
# Room past the model's own timeout for the final write.
WRITE_MARGIN = 60


def job_timeout(model: str) -> int:
    """Return RQ's hard limit for one attempt: the model's budget plus room to write the result."""
    spec = catalog().get(model)
    return int((spec.timeout if spec else DEFAULT_MODEL_TIMEOUT) + WRITE_MARGIN)


def enqueue(
    task_id: int,
    priority: int,
    model: str,
    delay: float = 0,
    job_id: str | None = None,
    at_front: bool = False,
    why: str = "committed",
    also: Rider | None = None,
) -> str | None:
    """Enqueue a committed task's job, or leave it to the sweeper when Redis is down.

    Returns the job id, or None when nothing was enqueued. `why` names the change for the log
    line ("committed", "deferred", "handed back", ...). `also` rides in the same round trip.
    """
    try:
        return enqueue_task(task_id, priority, job_timeout(model), delay, job_id=job_id, at_front=at_front, also=also)
    except RedisError as exc:
        log.warning("task %s %s but not enqueued (%s); the sweeper will enqueue it", task_id, why, type(exc).__name__)
        return None


def drop_job(job_id: str | None) -> None:
    """Take a cancelled or deleted task's job out of its queue, if Redis still has it (best effort)."""
    if not job_id:
        return
    try:
        job = Job.fetch(job_id, connection=redis())
        if job.get_status(refresh=False) in ("queued", "scheduled", "deferred"):
            job.cancel()
    except (NoSuchJobError, RedisError):
        pass
    except Exception:  # rq raises InvalidJobOperation and friends; none of it matters here.
        log.debug("could not drop job %s", job_id, exc_info=True)
