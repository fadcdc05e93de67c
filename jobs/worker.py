"""The RQ worker: one process runs up to `concurrency` tasks at once, each in a thread of its own.

An AI task spends almost all its time waiting for the provider, so a worker is a thread per
running job rather than a process per job (RQ's forking `Worker`). `TaskWorker` subclasses
RQ's `BaseWorker` and keeps RQ's own bookkeeping: each running job has its execution in the
StartedJobRegistry, the job and execution heartbeats and the worker's heartbeat are kept up
(for all running jobs in one pipeline), and finished and failed jobs land in RQ's registries,
so rq-dashboard and `/health` show the truth.

- **Taking work.** The loop takes a job only when a thread is free (it never holds a job it
  cannot start), waiting at most a second on Redis so it notices a stop request at once.
- **Timeouts** do not use SIGALRM (a process has one alarm, and only its main thread gets
  signals): the provider's read timeout and the model's whole-answer timeout end a stalled
  call, and a watchdog raises RQ's JobTimeoutException in a job thread that outlives its RQ job
  timeout (`WatchdogDeathPenalty`).
- **SIGTERM**: the worker takes no new job; running attempts finish within
  SHUTDOWN_GRACE_SECONDS or hand their task back, refunded (`jobs.shutdown.drain`); a thread
  still running a few seconds after that has its task handed back by the worker, which exits.
  A second SIGTERM (or Ctrl+C) hands back every running task at once and exits.
- **A thread that dies** (an exception that escaped RQ's own handling) has its task handed back
  at once (`webapp.lifecycle.attempts.release`, fenced by the job id), so it does not wait for the lease.
- **Redis going away**: the loop waits and tries again, with the running threads untouched;
  once Redis is back the worker registers itself again if Redis lost it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import threading
import time
from collections.abc import Sequence
from datetime import timedelta

from flask import Flask, current_app
from redis import BlockingConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import worker_registration
from rq.exceptions import DequeueTimeout, StopRequested
from rq.job import Job, JobStatus
from rq.job_lifecycle import call_exception_handlers
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.timeouts import BaseDeathPenalty
from rq.utils import now
from rq.worker import BaseWorker, WorkerStatus

from webapp.catalog import catalog
from webapp.extensions import db
from webapp.lifecycle import attempts
from webapp.queues import connect

from . import events
from . import run_task as _run_task  # noqa: F401 (loaded before the first job)
from .outage import with_database
from .provider import warm_clients
from .run_task import TaskAttemptError
from .shutdown import drain

log = logging.getLogger(__name__)

# Seconds after the grace period before the worker hands back what its threads still hold.
HARD_STOP_MARGIN = 5.0
TASK_FUNCTION = "jobs.run_task.run_task"
# Seconds the loop waits on Redis for a job before it looks at stop requests again.
DEQUEUE_WAIT = 1
# Seconds between two looks at `rq suspend`.
SUSPENSION_CHECK = 1.0


class Watchdog:
    """Raises an exception in job threads that outlive their deadline (checked about once a second)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deadlines: dict[BaseDeathPenalty, tuple[float, int]] = {}

    def watch(self, penalty: BaseDeathPenalty, seconds: float) -> None:
        with self._lock:
            self._deadlines[penalty] = (time.monotonic() + seconds, threading.get_ident())

    def forget(self, penalty: BaseDeathPenalty) -> None:
        with self._lock:
            self._deadlines.pop(penalty, None)

    def check(self) -> None:
        """Interrupt every thread past its deadline (when it next runs Python code)."""
        moment = time.monotonic()
        with self._lock:
            late = [(p, ident) for p, (deadline, ident) in self._deadlines.items() if deadline <= moment]
            for penalty, ident in late:
                del self._deadlines[penalty]
                log.warning("worker: a job thread ran past its time limit; interrupting it")
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(penalty._exception))


watchdog = Watchdog()


class WatchdogDeathPenalty(BaseDeathPenalty):
    """RQ's job time limit for a job running in a thread: one watchdog instead of a timer per job."""

    def setup_death_penalty(self) -> None:
        if self._timeout > 0:
            watchdog.watch(self, self._timeout)

    def cancel_death_penalty(self) -> None:
        watchdog.forget(self)


class TaskWorker(BaseWorker):
    """RQ's worker, running up to `concurrency` jobs at once in threads of one process."""

    death_penalty_class = WatchdogDeathPenalty
    # RQ waits up to 60 s between reconnection attempts by default; Redis restarts are short.
    max_connection_wait_time = 5.0

    def __init__(self, *args, app: Flask, concurrency: int = 32, grace: float = 40.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.app = app
        self.concurrency = concurrency
        self.grace = grace
        self._free = threading.Semaphore(concurrency)
        self._lock = threading.Lock()
        # execution id -> (job, queue, execution, thread)
        self._running: dict[str, tuple] = {}
        self._cold = False
        self._stopped = threading.Event()  # the loop has ended: no more heartbeats

    # --- the loop ---------------------------------------------------------------------------

    def work(self, burst: bool = False, logging_level: str | None = None, with_scheduler: bool = True, **_) -> bool:
        """Take jobs and start them in threads until asked to stop (or, in burst mode, until idle)."""
        self.bootstrap(logging_level)
        if with_scheduler:
            self._start_scheduler(burst, logging_level)
        self._install_signal_handlers()
        monitor = threading.Thread(target=self._monitor, name="worker-monitor", daemon=True)
        monitor.start()
        self.log.info("Worker %s: running up to %d tasks at once", self.name, self.concurrency)
        started = 0
        pause = 1.0
        checked = 0.0
        try:
            while not self._stop_requested:
                try:
                    # `rq suspend` is seen within a second (not a Redis round trip per job).
                    if time.monotonic() - checked >= SUSPENSION_CHECK:
                        self.check_for_suspension(burst)
                        checked = time.monotonic()
                    if self.should_run_maintenance_tasks:
                        self.run_maintenance_tasks()
                    if not self._free.acquire(timeout=DEQUEUE_WAIT):
                        continue
                    try:
                        result = self._dequeue(burst)
                    except BaseException:
                        self._free.release()
                        raise
                    pause = 1.0
                    if result is None:
                        self._free.release()
                        if burst and not self.running_count():
                            break
                        if burst:
                            time.sleep(0.05)
                        continue
                    self.execute_job(*result)
                    started += 1
                except StopRequested:
                    break
                except (RedisConnectionError, RedisTimeoutError) as exc:
                    self.log.warning("Worker %s: Redis unavailable (%s); trying again in %.0f s", self.name, exc, pause)
                    time.sleep(pause)
                    pause = min(pause * 2, self.max_connection_wait_time)
        finally:
            if not self._cold:
                self._wait_for_running(None if (burst and not self._stop_requested) else self.grace + HARD_STOP_MARGIN)
            self._stopped.set()
            monitor.join(5)
            with contextlib.suppress(RedisError):
                self.teardown()
        return bool(started)

    def _dequeue(self, burst: bool) -> tuple[Job, Queue] | None:
        try:
            result = self.queue_class.dequeue_any(
                self._ordered_queues,
                None if burst else DEQUEUE_WAIT,
                connection=self.connection,
                job_class=self.job_class,
                serializer=self.serializer,
                death_penalty_class=self.death_penalty_class,
            )
        except DequeueTimeout:
            return None
        if result is not None:
            job, queue = result
            self.reorder_queues(reference_queue=queue)
            job.redis_server_version = self.get_redis_server_version()
            self.log.debug("Worker %s: %s: %s", self.name, queue.name, job.id)
        return result

    def running_count(self) -> int:
        with self._lock:
            return len(self._running)

    def handle_exception(self, job: Job, *exc_info) -> None:
        """Log a failed attempt in one line: the task's own log lines already said why.

        `run_task` raises TaskAttemptError (ids and an error class only) so that RQ files the job
        as failed; the provider's refusal, the retry or the crash (with its traceback) were logged
        by `jobs.events` as they happened, so RQ's ERROR line with a traceback of this
        bookkeeping exception would only be noise. Anything else gets RQ's treatment.
        """
        if isinstance(exc_info[1], TaskAttemptError):
            self.log.info("Worker %s: job %s: attempt failed (%s)", self.name, job.id, exc_info[1])
            call_exception_handlers(self._exc_handlers, job, *exc_info)
            return
        super().handle_exception(job, *exc_info)

    # --- one job ----------------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Start the job in a thread of its own (a free slot was taken for it)."""
        execution = self.prepare_execution(job)
        thread = threading.Thread(target=self._run_job, args=(job, queue, execution), name=f"job-{job.id}", daemon=True)
        with self._lock:
            self._running[execution.id] = (job, queue, execution, thread)
        thread.start()

    def _run_job(self, job: Job, queue: Queue, execution) -> None:
        finished = False
        try:
            with self.app.app_context():
                try:
                    # RQ's own path: started registry, time limit, success/failure and registries.
                    self.perform_job(job, queue, execution)
                    finished = True
                finally:
                    db.session.remove()
        except BaseException:
            self.log.exception("Worker %s: the thread running job %s died", self.name, job.id)
        finally:
            if not finished and not self._cold:
                self._hand_back(job, shutdown=self._stop_requested)
                self._forget_execution(job, execution)
            with self._lock:
                self._running.pop(execution.id, None)
                idle = not self._running
            self._free.release()
            if idle:
                with contextlib.suppress(RedisError):
                    self.set_state(WorkerStatus.IDLE)

    def _forget_execution(self, job: Job, execution) -> None:
        """Take an execution that will not end normally out of RQ's started registry; the job failed."""
        try:
            with self.connection.pipeline() as pipeline:
                job.set_status(JobStatus.FAILED, pipeline=pipeline)
                self.cleanup_execution(job, pipeline=pipeline, execution=execution)
                pipeline.execute()
        except RedisError:
            self.log.warning("Worker %s: could not clear job %s from RQ's registries", self.name, job.id)

    def _hand_back(self, job: Job, shutdown: bool) -> None:
        """Hand back the task of a job that will not finish (refunded if we are shutting down)."""
        if job.func_name != TASK_FUNCTION or not job.args:
            return
        task_id = int(job.args[0])
        if shutdown:
            kind, reason = "shutdown", attempts.SHUT_DOWN
        else:
            kind, reason = "worker_lost", attempts.THREAD_DIED
        with self.app.app_context():
            try:
                status = with_database(
                    lambda: attempts.release(task_id, job.id, kind, reason, refund=shutdown), seconds=5
                )
            except Exception:
                db.session.rollback()
                self.log.exception("Worker %s: could not hand back task %s; the sweeper will", self.name, task_id)
                return
            finally:
                db.session.remove()
            if status is not None:
                events.released(task_id, job.id, f"{kind}: attempt ended without finishing", status)

    # --- heartbeats and time limits ------------------------------------------------------------

    def _monitor(self) -> None:
        """Keep RQ's heartbeats up for the worker and every running job; enforce time limits."""
        beat = 0.0
        interval = min(self.job_monitoring_interval, 10)
        while not self._stopped.wait(1):
            watchdog.check()
            if time.monotonic() - beat < interval:
                continue
            beat = time.monotonic()
            try:
                self._heartbeats()
            except RedisError as exc:
                self.log.warning("Worker %s: heartbeat failed (%s)", self.name, exc)

    def _heartbeats(self) -> None:
        """One pipeline: the worker's heartbeat, and each running job's and execution's."""
        with self._lock:
            running = list(self._running.values())
        worker_ttl = self.worker_ttl + 60
        with self.connection.pipeline() as pipeline:
            self.heartbeat(worker_ttl, pipeline=pipeline)
            for job, _queue, execution, _thread in running:
                working = (now() - job.started_at).total_seconds() if job.started_at else 0.0
                ttl = int(self.get_heartbeat_ttl(job, working_time=working))
                execution.heartbeat(job.started_job_registry, ttl, pipeline=pipeline)
                job.heartbeat(now(), ttl, pipeline=pipeline, xx=True)
            results = pipeline.execute()
            # Redis lost the worker (restarted empty, or the sweeper took it for dead while it
            # was cut off): register it again.
            if results[0] == 1:
                pipeline.hset(self.key, mapping=self.serialize())
                pipeline.expire(self.key, worker_ttl)
                worker_registration.register(self, pipeline)
                pipeline.execute()

    # --- stopping -----------------------------------------------------------------------------

    def request_stop(self, signum, frame) -> None:
        """Warm shutdown: take no new job; running attempts finish or hand back within the grace period."""
        self._shutdown_requested_date = now()
        signal.signal(signal.SIGINT, self.request_force_stop)
        signal.signal(signal.SIGTERM, self.request_force_stop)
        self.log.info(
            "Worker %s: stopping; %d running tasks finish or hand back within %.0f s",
            self.name,
            self.running_count(),
            self.grace,
        )
        self._stop_requested = True
        drain.request(self.grace)
        with contextlib.suppress(RedisError):
            self.set_shutdown_requested_date()

    def request_force_stop(self, signum, frame) -> None:
        """Cold shutdown (a second SIGTERM, or Ctrl+C twice): hand back every running task now, exit."""
        if self._shutdown_requested_date and now() - self._shutdown_requested_date < timedelta(seconds=1):
            return  # the same signal delivered twice (process groups do that)
        self.log.warning("Worker %s: cold shut down", self.name)
        self._cold = True
        self._stop_requested = True
        self._abandon_running()
        raise SystemExit()

    def _wait_for_running(self, seconds: float | None) -> None:
        """Wait for the running jobs to end (up to `seconds`), then hand back what is left."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while self.running_count() and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.05)
        if self.running_count():
            self.log.warning("Worker %s: tasks still running after the grace period; handing them back", self.name)
            self._cold = True
            self._abandon_running()

    def _abandon_running(self) -> None:
        with self._lock:
            running = list(self._running.values())
        for job, _queue, execution, _thread in running:
            self._hand_back(job, shutdown=True)
            self._forget_execution(job, execution)


def make_worker(queues: Sequence[str], name: str | None = None, concurrency: int | None = None) -> TaskWorker:
    """Return a worker on `queues`, in order of preference, for the current app."""
    app = current_app._get_current_object()
    config = app.config
    concurrency = concurrency or int(config["WORKER_CONCURRENCY"])
    warm_clients(catalog(), pool_size=concurrency)
    # A connection of its own without a read timeout (RQ sets one longer than its waits); the
    # pool is shared by the loop, the monitor and the job threads' bookkeeping, and bounded.
    pool = BlockingConnectionPool.from_url(
        config["REDIS_URL"], socket_connect_timeout=5, max_connections=min(concurrency, 50) + 5, timeout=30
    )
    # Every job thread may be in a Redis call at once (limits, breaker, metrics) on the app's
    # client: one connection per thread, and a few for the rest.
    app.extensions["redis"] = connect(config["REDIS_URL"], max_connections=concurrency + 10)
    app.extensions.pop("model_limits", None)  # made again on the new client
    return TaskWorker(
        list(queues),
        name=name,
        connection=Redis(connection_pool=pool),
        serializer=JSONSerializer,
        app=app,
        concurrency=concurrency,
        grace=float(config["SHUTDOWN_GRACE_SECONDS"]),
        # RQ's own registry upkeep (abandoned jobs, stale workers): every minute, not ten.
        maintenance_interval=60,
    )


def run_worker(
    queues: Sequence[str], name: str | None = None, burst: bool = False, concurrency: int | None = None
) -> None:
    """Run a worker until it is asked to stop; wait for Redis if it is not there yet."""
    level = current_app.config["LOG_LEVEL"]
    pause = 1.0
    while True:
        try:
            worker = make_worker(queues, name=name, concurrency=concurrency)
            worker.work(burst=burst, with_scheduler=True, logging_level=level)
            return
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("worker: Redis unavailable at start (%s); trying again in %.0f s", exc, pause)
        time.sleep(pause)
        pause = min(pause * 2, 10.0)
