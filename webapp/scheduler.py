"""The scheduler process (`flask --app wsgi scheduler`): the periodic work, until it is stopped.

It runs the sweeper every SWEEP_INTERVAL, and the retention cleanup and the purge of idle
sign-ins every CLEANUP_INTERVAL, all once at start; the webhook outbox's sweep and cleanup
(`services/outbox.py`) ride along. A pass that fails (Redis or the database away) is logged
and the loop goes on: the next pass may find them back.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from flask import current_app

from jobs.sweeper import sweep

from .extensions import db
from .services import batches, outbox
from .services.retention import cleanup
from .services.sessions import purge_idle

log = logging.getLogger("scheduler")


def run_scheduler() -> None:
    """Run the periodic duties in the current app until SIGTERM or SIGINT."""
    config = current_app.config
    duties = [
        (sweep, config["SWEEP_INTERVAL"]),
        (cleanup, config["CLEANUP_INTERVAL"]),
        (purge_idle, config["CLEANUP_INTERVAL"]),
        # Webhook deliveries whose job Redis lost, and deliveries past RETENTION_DAYS.
        (outbox.sweep, config["SWEEP_INTERVAL"]),
        (outbox.cleanup, config["CLEANUP_INTERVAL"]),
        # Batches whose intake job was lost, whose lines have all finished, or whose window ran out.
        (batches.sweep, config["SWEEP_INTERVAL"]),
        (batches.cleanup, config["CLEANUP_INTERVAL"]),
    ]
    due = [0.0] * len(duties)  # monotonic time each duty is next due: all run at start
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info(
        "sweeping every %s s, deleting finished tasks older than %s days every %s s",
        config["SWEEP_INTERVAL"],
        config["RETENTION_DAYS"],
        config["CLEANUP_INTERVAL"],
    )
    while not stop.is_set():
        for index, (duty, interval) in enumerate(duties):
            if time.monotonic() < due[index] or stop.is_set():
                continue
            try:
                duty()
            except Exception:  # keep going: the next pass may find Redis and the database back
                log.exception("%s failed", duty.__name__)
                db.session.rollback()
            finally:
                db.session.remove()
            due[index] = time.monotonic() + interval
        stop.wait(max(0.0, min(due) - time.monotonic()))
    log.info("scheduler stopped")
