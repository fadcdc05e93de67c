"""The RQ worker that runs tasks inside the Flask app, and what it does when things die.

- A work-horse that dies mid-task (kill -9, out of memory) is noticed by its parent at once:
  the parent hands the task back (`progress.release`) instead of leaving it to the lease.
- SIGTERM: the worker takes no new job; the work-horse is told to drain (SIGUSR1), so its
  attempt finishes within SHUTDOWN_GRACE_SECONDS or hands the task back; a horse still
  running a few seconds after that is killed and its task handed back by the parent. A
  second SIGTERM (or Ctrl+C) stops at once, also handing the task back.
- Redis going away ends RQ's work loop; `run_worker` starts it again when Redis is back,
  in the same process.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from datetime import timedelta

from flask import current_app
from redis import Redis
from redis.exceptions import RedisError
from rq import Worker
from rq.serializers import JSONSerializer
from rq.utils import now

from webapp.catalog import catalog
from webapp.extensions import db

from . import events, progress

# Imported here, in the parent, so every forked work-horse starts with the job code (and the
# openai SDK, slow to import) already loaded.
from . import run_task as _run_task  # noqa: F401
from .provider import warm_clients
from .shutdown import drain

log = logging.getLogger(__name__)

# Parent → work-horse: "the worker is stopping; finish or hand back within the grace period".
DRAIN_SIGNAL = signal.SIGUSR1
# Seconds after the grace period before a horse that has not ended is killed.
HARD_STOP_MARGIN = 5.0
TASK_FUNCTION = "jobs.run_task.run_task"


class TaskWorker(Worker):
    """RQ's forking worker; each work-horse starts with fresh database connections.

    A forked child must not use sockets it inherited from its parent's connection pool, so the
    horse drops the pool (without closing the parent's connections) before running the job.
    """

    # RQ waits up to 60 s between reconnection attempts by default; Redis restarts are short.
    max_connection_wait_time = 5.0

    def __init__(self, *args, grace: float = 40.0, **kwargs):
        super().__init__(*args, work_horse_killed_handler=self._horse_died, **kwargs)
        self.grace = grace
        self._draining = False
        self._running = None  # the job the current horse runs

    def execute_job(self, job, queue):
        self._running = job
        try:
            super().execute_job(job, queue)
        finally:
            self._running = None

    def main_work_horse(self, job, queue):
        db.engine.dispose(close=False)
        drain.reset()
        super().main_work_horse(job, queue)

    def setup_work_horse_signals(self):
        super().setup_work_horse_signals()
        signal.signal(DRAIN_SIGNAL, lambda *_: drain.request(self.grace))

    def fork_work_horse(self, job, queue):
        super().fork_work_horse(job, queue)
        if self._draining:  # SIGTERM came between taking the job and forking its horse
            self._drain_horse(self.horse_pid)

    def handle_warm_shutdown_request(self):
        super().handle_warm_shutdown_request()
        self._draining = True
        if self.horse_pid:
            self._drain_horse(self.horse_pid)

    def _drain_horse(self, pid: int) -> None:
        """Tell the horse to finish or hand back within the grace period; kill it a bit after."""
        self.log.info("Worker %s: asking horse %s to finish or hand back within %.0f s", self.name, pid, self.grace)
        try:
            # A horse too young to have its handler dies of the signal: the killed handler
            # then hands its task back, refunded, which is what draining would do anyway.
            os.kill(pid, DRAIN_SIGNAL)
        except ProcessLookupError:
            return
        timer = threading.Timer(self.grace + HARD_STOP_MARGIN, self._hard_stop, args=(pid,))
        timer.daemon = True
        timer.start()

    def _hard_stop(self, pid: int) -> None:
        """Kill a horse that outlived the grace period; the killed handler hands its task back."""
        if self.horse_pid == pid:
            self.log.warning("Worker %s: horse %s still running after the grace period; stopping it", self.name, pid)
            self.kill_horse()

    def request_force_stop(self, signum, frame):
        """Cold shutdown (a second SIGTERM, or Ctrl+C twice): kill the horse, hand its task back, exit."""
        if self._shutdown_requested_date and now() - self._shutdown_requested_date < timedelta(seconds=1):
            return  # the same signal delivered twice (worker pools do that)
        self.log.warning("Worker %s: cold shut down", self.name)
        job = self._running
        if self.horse_pid:
            self.kill_horse()
            self.wait_for_horse()
        if job is not None:
            self._release(job, shutdown=True)
        raise SystemExit()

    def _horse_died(self, job, retpid, ret_val, rusage) -> None:
        self._release(job, shutdown=self._draining)

    def _release(self, job, shutdown: bool) -> None:
        """Hand back the task of a job whose horse is gone (refunded if we were shutting down)."""
        if job.func_name != TASK_FUNCTION or not job.args:
            return
        task_id = int(job.args[0])
        if shutdown:
            kind, reason = "shutdown", "The worker running this task shut down."
        else:
            kind, reason = "worker_lost", "The worker running this task died."
        try:
            status = progress.with_database(lambda: progress.release(task_id, job.id, kind, reason, refund=shutdown))
        except Exception:
            db.session.rollback()
            self.log.exception("Worker %s: could not hand back task %s; the sweeper will", self.name, task_id)
            return
        finally:
            db.session.remove()
        events.released(task_id, job.id, f"{kind}: work-horse ended without finishing", status)


def make_worker(queues: Sequence[str], name: str | None = None) -> TaskWorker:
    """Return a worker on `queues`, in order of preference, for the current app."""
    config = current_app.config
    warm_clients(catalog())
    # A connection of its own without a read timeout: dequeueing blocks on BLPOP for minutes.
    connection = Redis.from_url(config["REDIS_URL"], socket_connect_timeout=5)
    return TaskWorker(
        list(queues),
        name=name,
        connection=connection,
        serializer=JSONSerializer,
        grace=float(config["SHUTDOWN_GRACE_SECONDS"]),
        # RQ's own registry upkeep (abandoned jobs, stale workers): every minute, not ten.
        maintenance_interval=60,
    )


def run_worker(queues: Sequence[str], name: str | None = None, burst: bool = False) -> None:
    """Run a worker until it is asked to stop, starting RQ's loop again if Redis drops it."""
    level = current_app.config["LOG_LEVEL"]
    stop = threading.Event()
    pause = 1.0
    generation = 0
    while True:
        worker_name = name if not (name and generation) else f"{name}-{generation}"
        started = time.monotonic()
        try:
            worker = make_worker(queues, name=worker_name)
            worker.work(burst=burst, with_scheduler=True, logging_level=level)
        except RedisError as exc:
            log.warning("worker: Redis unavailable (%s)", exc)
            worker = None
        if burst or stop.is_set() or (worker is not None and worker._shutdown_requested_date is not None):
            return
        # RQ's loop ended without a stop request: Redis went away. Wait, then start again.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        if time.monotonic() - started > 60:
            pause = 1.0  # it had been working: this is a new outage
        log.warning("worker: RQ's loop ended; starting again in %.0f s", pause)
        if stop.wait(pause):
            return
        pause = min(pause * 2, 10.0)
        generation += 1
