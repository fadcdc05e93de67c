"""One thread per worker process writes what all its running attempts have to say, in batches.

An attempt appends the answer's pieces to its `Entry` and nothing more; about once a second
(PROGRESS_INTERVAL) the tracker writes, in one statement and one transaction, the text so far
and progress of every attempt that received something since its last write, and renews the
lease of every attempt whose lease is a third spent:

    UPDATE tasks SET result = …, progress = …, lease_expires_at = …
    FROM unnest(:ids, :attempts, :texts, …) AS v
    WHERE tasks.id = v.id AND tasks.attempts = v.attempt AND tasks.status = 'PROCESSING'
    RETURNING tasks.id

A row that does not come back is no longer this attempt's (cancelled, deleted, taken back):
its entry is marked `lost`, and the attempt stops at its next piece. So a process with
hundreds of calls in flight uses one database connection for all their progress, not one per
call, and the claim and the final write stay per task. The same tick renews the model-limit
slots (`jobs/limits.py`) the attempts hold.

A database outage skips writes (the stream goes on); the leases have room for a few misses.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from flask import Flask
from sqlalchemy import bindparam, text, update

from webapp.extensions import db
from webapp.lifecycle.attempts import Claim
from webapp.models import Task, TaskStatus, UTCDateTime, utcnow

from .limits import Hold, model_limits

log = logging.getLogger(__name__)

# Rows per statement (and per transaction, holding their row locks).
BATCH_ROWS = 500

# One statement, compiled once: the rows travel as arrays, one per column.
_UPDATE = text(
    """
UPDATE tasks SET
    result = CASE WHEN v.has_text THEN v.text ELSE tasks.result END,
    progress = CASE WHEN v.has_text THEN v.progress ELSE tasks.progress END,
    lease_expires_at = :lease,
    updated_at = :now
FROM unnest(
    CAST(:ids AS integer[]), CAST(:attempts AS integer[]), CAST(:has_text AS boolean[]),
    CAST(:texts AS text[]), CAST(:progress AS integer[])
) AS v(id, attempt, has_text, text, progress)
WHERE tasks.id = v.id AND tasks.attempts = v.attempt AND tasks.status = 'PROCESSING'
RETURNING tasks.id
"""
).bindparams(bindparam("now", type_=UTCDateTime()), bindparam("lease", type_=UTCDateTime()))


@dataclass(eq=False)
class Entry:
    """A running attempt (`jobs.run_task.Attempt`) as the tracker sees it: its claim, the pieces
    streamed so far, and the model-limit slot it holds (renewed here)."""

    claim: Claim
    budget: int
    pieces: list[str] = field(default_factory=list)
    hold: Hold | None = None
    lost: threading.Event = field(default_factory=threading.Event)
    written: int = 0  # pieces already in the row
    renewed: float = field(default_factory=time.monotonic)


class Tracker:
    """The batch writer of one process; started on first use."""

    def __init__(self, app: Flask):
        self.app = app
        self.entries: dict[int, Entry] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._slots_renewed = time.monotonic()
        self.interval = float(app.config["PROGRESS_INTERVAL"])
        self.lease_seconds = float(app.config["LEASE_SECONDS"])
        # Statements and rows written, for tests and benchmarks.
        self.statements = 0
        self.rows = 0

    def add(self, claim: Claim, budget: int, hold: Hold | None = None) -> Entry:
        entry = Entry(claim, max(budget, 1), hold=hold)
        with self._lock:
            self.entries[claim.task_id] = entry
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="task-tracker", daemon=True)
                self._thread.start()
        return entry

    def remove(self, entry: Entry) -> None:
        with self._lock:
            if self.entries.get(entry.claim.task_id) is entry:
                del self.entries[entry.claim.task_id]

    def running(self) -> list[Entry]:
        with self._lock:
            return list(self.entries.values())

    def _run(self) -> None:
        with self.app.app_context():
            while True:
                time.sleep(self.interval)
                try:
                    self.tick()
                except Exception:  # a database blip: the next tick tries again
                    log.warning("tracker: batch write failed", exc_info=True)
                    db.session.rollback()
                finally:
                    db.session.remove()

    def tick(self) -> None:
        """Write the text so far and renew the leases of the running attempts that need it."""
        now = time.monotonic()
        running = self.running()
        due = []
        for entry in running:
            grown = len(entry.pieces) > entry.written
            if grown or now - entry.renewed >= self.lease_seconds / 3:
                due.append((entry, grown))
        holds = [entry.hold for entry in running if entry.hold is not None]
        if holds and now - self._slots_renewed >= self.lease_seconds / 3:
            self._slots_renewed = now
            model_limits().renew(holds)
        for start in range(0, len(due), BATCH_ROWS):
            self._write(due[start : start + BATCH_ROWS], now)

    def _write(self, due: list[tuple[Entry, bool]], now: float) -> None:
        rows = []
        for entry, grown in due:
            count = len(entry.pieces)  # pieces appended meanwhile are written next time
            claim = entry.claim
            text_so_far = "".join(entry.pieces[:count]) if grown else None
            rows.append(
                (entry, claim.task_id, claim.attempt, grown, text_so_far, min(99, 100 * count // entry.budget), count)
            )
        stamp = utcnow()
        lease = stamp + timedelta(seconds=self.lease_seconds)
        if db.engine.dialect.name == "postgresql":
            ours = self._write_postgresql(rows, stamp, lease)
        else:
            ours = self._write_each(rows, stamp, lease)
        db.session.commit()
        self.statements += 1
        self.rows += len(rows)
        for entry, task_id, _, _, _, _, count in rows:
            if task_id in ours:
                entry.written = count
                entry.renewed = now
            else:
                entry.lost.set()

    def _write_postgresql(self, rows: list, stamp: datetime, lease: datetime) -> set[int]:
        """One UPDATE … FROM unnest(…) for every row."""
        columns = list(zip(*(row[1:6] for row in rows), strict=True))
        params = dict(zip(("ids", "attempts", "has_text", "texts", "progress"), map(list, columns), strict=True))
        return set(db.session.execute(_UPDATE, {**params, "now": stamp, "lease": lease}).scalars())

    def _write_each(self, rows: list, stamp: datetime, lease: datetime) -> set[int]:
        """The same, a fenced UPDATE per row in one transaction (SQLite, the embedded setup)."""
        ours = set()
        for _, task_id, attempt, grown, text_so_far, share, _ in rows:
            values: dict = {"lease_expires_at": lease, "updated_at": stamp}
            if grown:
                values.update(result=text_so_far, progress=share)
            hit = db.session.execute(
                update(Task)
                .where(Task.id == task_id, Task.attempts == attempt, Task.status == TaskStatus.PROCESSING.value)
                .values(**values)
            )
            if hit.rowcount == 1:
                ours.add(task_id)
        return ours


_trackers: dict[int, Tracker] = {}
_trackers_lock = threading.Lock()


def tracker(app: Flask) -> Tracker:
    """Return the process's tracker for `app`."""
    with _trackers_lock:
        found = _trackers.get(id(app))
        if found is None:
            found = _trackers[id(app)] = Tracker(app)
        return found
