"""The RQ worker that runs tasks inside the Flask app."""

from __future__ import annotations

from collections.abc import Sequence

from flask import current_app
from redis import Redis
from rq import Worker
from rq.serializers import JSONSerializer

from webapp.extensions import db

# Imported here, in the parent, so every forked work-horse starts with the job code (and the
# openai SDK, slow to import) already loaded.
from . import run_task  # noqa: F401


class TaskWorker(Worker):
    """RQ's forking worker; each work-horse starts with fresh database connections.

    A forked child must not use sockets it inherited from its parent's connection pool, so the
    horse drops the pool (without closing the parent's connections) before running the job.
    """

    def main_work_horse(self, job, queue):
        db.engine.dispose(close=False)
        super().main_work_horse(job, queue)


def make_worker(queues: Sequence[str], name: str | None = None) -> TaskWorker:
    """Return a worker on `queues`, in order of preference, for the current app."""
    # A connection of its own without a read timeout: dequeueing blocks on BLPOP for minutes.
    connection = Redis.from_url(current_app.config["REDIS_URL"], socket_connect_timeout=5)
    return TaskWorker(list(queues), name=name, connection=connection, serializer=JSONSerializer)
