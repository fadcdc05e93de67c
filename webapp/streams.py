"""Event streams of tasks: one watcher per web process reads the rows that open streams follow.

A stream holds a gunicorn thread, so it must hold nothing else: it reads its task once when it
opens and then only waits. One thread per process (the `Watcher`) looks at every followed row
in one statement every STREAM_POLL_INTERVAL (a quarter second) and reads in full only the rows
that changed; it hands each stream the new row and wakes it. Two hundred open streams cost
four small queries a second, not eight hundred, and no pooled connection is held while waiting.

What a stream sends (`events`), as text/event-stream:

- `event: text`, `id:` the number of characters of the answer sent so far, `data: {"delta",
  "progress"}`; when an attempt starts over (a retry), the answer does too: one `text` event
  with `"reset": true`, `id: 0` and an empty delta comes first, and the count starts from 0.
- `event: status`, `data:` the task, when the stream opens and on every change of status;
- the stream ends after a finished status (or when the task is deleted);
- a keep-alive comment after STREAM_KEEPALIVE_SECONDS of silence;
- when the web process shuts down, its streams end at once (clients resume with Last-Event-ID).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping

from flask import Flask
from sqlalchemy import func, select

from .extensions import db
from .models import FINISHED, Task
from .outbox import task_object

log = logging.getLogger(__name__)

_tasks = Task.__table__
CHUNK = 500
# Set when the web process is asked to stop (gunicorn.conf.py): every stream ends at once, and
# its client resumes elsewhere with Last-Event-ID instead of holding up the restart.
STOPPING = threading.Event()
_watchers: list[Watcher] = []


class Subscription:
    """One open stream's view of its task: the newest row, and a flag raised when it changes."""

    def __init__(self, task_id: int, row: Mapping):
        self.task_id = task_id
        self.row: Mapping | None = row
        self.changed = threading.Event()
        self.released = False

    def take(self, timeout: float) -> tuple[bool, Mapping | None]:
        """Wait up to `timeout` for a change; return (changed, newest row or None if deleted)."""
        changed = self.changed.wait(timeout)
        self.changed.clear()
        return changed, self.row


def _stamp(row: Mapping) -> tuple:
    """What tells that a row changed, read without its text."""
    text = row.get("result")
    length = row["length"] if "length" in row else (len(text) if text else 0)
    return (row["updated_at"], row["status"], row["progress"], row["attempts"], length or 0)


class Watcher:
    """The one reader of followed rows in a process; started with its first stream."""

    def __init__(self, app: Flask):
        self.app = app
        self.interval = float(app.config["STREAM_POLL_INTERVAL"])
        self.cap = int(app.config["STREAMS_PER_PROCESS"])
        self._lock = threading.Lock()
        self._subs: dict[int, set[Subscription]] = {}
        self._known: dict[int, tuple[tuple, Mapping]] = {}
        self._open = 0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self) -> bool:
        """Count a stream in, unless the process holds its cap already."""
        with self._lock:
            if self._open >= self.cap:
                return False
            self._open += 1
            return True

    @property
    def streams(self) -> int:
        return self._open

    def subscribe(self, task_id: int, row: Mapping) -> Subscription:
        sub = Subscription(task_id, row)
        with self._lock:
            known = self._known.get(task_id)
            if known is not None and known[0][0] > row["updated_at"]:
                sub.row = known[1]  # the watcher has seen newer than this stream's read
                sub.changed.set()
            else:
                self._known[task_id] = (_stamp(row), row)
            self._subs.setdefault(task_id, set()).add(sub)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="stream-watcher", daemon=True)
                self._thread.start()
        self._wake.set()
        return sub

    def wake_all(self) -> None:
        with self._lock:
            for subs in self._subs.values():
                for sub in subs:
                    sub.changed.set()

    def release(self, sub: Subscription) -> None:
        """Let a stream go: stop following its task for it, and count it out (once)."""
        with self._lock:
            if sub.released:
                return
            sub.released = True
            self._open -= 1
        self.unsubscribe(sub)

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.task_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[sub.task_id]
                    self._known.pop(sub.task_id, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                idle = not self._subs
            if idle:
                self._wake.wait(5)
                self._wake.clear()
                continue
            started = time.monotonic()
            try:
                with self.app.app_context():
                    self.tick()
            except Exception:  # a database blip: streams wait, the next tick tries again
                log.warning("streams: reading followed tasks failed", exc_info=True)
            time.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    def tick(self) -> None:
        """Read the stamps of every followed row; hand the changed rows, read in full, to their streams."""
        with self._lock:
            ids = list(self._subs)
            known = {task_id: self._known.get(task_id) for task_id in ids}
        changed: list[int] = []
        seen: set[int] = set()
        with db.engine.connect() as connection:
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start : start + CHUNK]
                stamps = connection.execute(
                    select(
                        _tasks.c.id,
                        _tasks.c.updated_at,
                        _tasks.c.status,
                        _tasks.c.progress,
                        _tasks.c.attempts,
                        func.coalesce(func.length(_tasks.c.result), 0).label("length"),
                    ).where(_tasks.c.id.in_(chunk))
                ).mappings()
                for stamp in stamps:
                    seen.add(stamp["id"])
                    previous = known.get(stamp["id"])
                    if previous is None or _stamp(stamp) != previous[0]:
                        changed.append(stamp["id"])
            rows = []
            for start in range(0, len(changed), CHUNK):
                chunk = changed[start : start + CHUNK]
                rows += [dict(r) for r in connection.execute(select(_tasks).where(_tasks.c.id.in_(chunk))).mappings()]
        with self._lock:
            for row in rows:
                self._known[row["id"]] = (_stamp(row), row)
                for sub in self._subs.get(row["id"], ()):
                    sub.row = row
                    sub.changed.set()
            for task_id in set(ids) - seen:  # deleted
                for sub in self._subs.get(task_id, ()):
                    sub.row = None
                    sub.changed.set()


def watcher(app: Flask) -> Watcher:
    """Return the process's watcher (made on first use)."""
    found = app.extensions.get("stream_watcher")
    if found is None:
        found = app.extensions.setdefault("stream_watcher", Watcher(app))
        _watchers.append(found)
    return found


def stop_all() -> None:
    """End every open stream of this process (it is shutting down)."""
    STOPPING.set()
    for owner in _watchers:
        owner.wake_all()


def parse_offset(value: str | None) -> int:
    """Return the offset a Last-Event-ID names; anything but a whole number of characters is 0."""
    if value is None or not value.strip().isdigit():
        return 0
    return min(int(value.strip()), 10**12)


def _event(name: str, data: dict, event_id: int | None = None) -> str:
    head = f"event: {name}\n" + (f"id: {event_id}\n" if event_id is not None else "")
    return head + "data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def events(sub: Subscription, offset: int, keepalive: float) -> Iterator[str]:
    """Yield the stream of one task from `offset` characters on, until it finishes.

    The caller lets the subscription go when the response closes (`Watcher.release`): a
    generator that never started runs no `finally`.
    """
    yield "retry: 2000\n\n"
    sent, attempt, status = offset, sub.row["attempts"], None
    row: Mapping | None = sub.row
    while row is not None:
        text = row["result"] or ""
        if (row["attempts"] != attempt and sent > 0) or len(text) < sent:
            sent = 0  # a new attempt: its answer starts from nothing
            yield _event("text", {"delta": "", "progress": row["progress"], "reset": True}, 0)
        attempt = row["attempts"]
        if len(text) > sent:
            yield _event("text", {"delta": text[sent:], "progress": row["progress"]}, len(text))
            sent = len(text)
        if row["status"] != status:
            status = row["status"]
            yield _event("status", task_object(row))
        if status in FINISHED:
            return
        changed, newest = sub.take(keepalive)
        if STOPPING.is_set():
            yield ": the server is restarting; reconnect with Last-Event-ID\n\n"
            return
        if not changed:
            yield ": keep-alive\n\n"
            continue
        row = newest
