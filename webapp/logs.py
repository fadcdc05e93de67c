"""Logging: one line per event, as text by default or as JSON lines with LOG_FORMAT=json.

Every process (web, worker, scheduler) logs through the root logger set up here, RQ's own
worker lines included (RQ adds no handler of its own when the root has one). Lines written while
a worker runs a job carry the job id and the task id as fields, whichever logger wrote them.
"""

from __future__ import annotations

import logging
import re
import sys

from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Our job ids name their task (webapp.queues.new_job_id).
JOB_ID = re.compile(r"^task-(\d+)-")


class JobContext(logging.Filter):
    """Add `job_id` and `task_id` to records about a job: written while it runs, or naming it.

    A forking RQ worker logs about a job from the parent process (dequeued, finished), where no
    job is current; those lines pass the job id as an argument, which is picked up here.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = self._current_job_id() or self._job_id_in_args(record)
            if record.job_id is None:
                del record.job_id
        job_id = getattr(record, "job_id", None)
        if getattr(record, "task_id", None) is None and job_id:
            match = JOB_ID.match(str(job_id))
            if match:
                record.task_id = int(match.group(1))
        return True

    @staticmethod
    def _current_job_id() -> str | None:
        from rq import get_current_job

        try:
            job = get_current_job()
        except Exception:  # no job context here (web, scheduler): nothing to add
            return None
        return job.id if job is not None else None

    @staticmethod
    def _job_id_in_args(record: logging.LogRecord) -> str | None:
        args = record.args if isinstance(record.args, tuple) else ()
        return next((arg for arg in args if isinstance(arg, str) and JOB_ID.match(arg)), None)


def formatter(log_format: str) -> logging.Formatter:
    """Return the formatter for LOG_FORMAT: "json" for JSON lines, anything else for text."""
    if log_format.strip().lower() == "json":
        # Extra fields (task_id, job_id, ...) become keys of the object.
        return JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            datefmt="%Y-%m-%dT%H:%M:%S%z",
        )
    return logging.Formatter(TEXT_FORMAT)


class AppHandler(logging.StreamHandler):
    """The app's one handler on the root logger (a class of its own so set-up can replace it)."""


def setup_logging(level: str = "INFO", log_format: str = "text", stream=None) -> None:
    """Send every logger's records to one stream handler on the root logger, in the configured format."""
    handler = AppHandler(stream or sys.stderr)
    handler.setFormatter(formatter(log_format))
    handler.addFilter(JobContext())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, AppHandler)]:
        root.removeHandler(old)  # set up again (another app in this process): replace, never stack
    root.addHandler(handler)
    root.setLevel(level.upper())
