"""Graceful shutdown, for any kind of worker: stop taking work, finish or hand back, exit.

A worker asked to stop (SIGTERM) calls `drain.request(grace)`. From then on an attempt in
this process starts no new provider call, and one still streaming at the deadline hands its
task back (PENDING, a fresh job enqueued at once, the attempt refunded) instead of being
killed with it. Code that runs attempts only asks `drain.draining` and `drain.expired()`; the
threaded worker (jobs/worker.py) calls `drain.request` on SIGTERM and, past the deadline, hands
back whatever its threads still hold with `webapp.lifecycle.attempts.release`.
"""

from __future__ import annotations

import threading
import time


class Drain:
    """The process-wide shutdown request and its deadline."""

    def __init__(self) -> None:
        self._deadline: float | None = None
        self._event = threading.Event()

    def request(self, grace: float) -> None:
        """Start draining: attempts still running must end within `grace` seconds."""
        if self._deadline is None:  # a second request does not extend the first deadline
            self._deadline = time.monotonic() + grace
        self._event.set()

    @property
    def draining(self) -> bool:
        return self._event.is_set()

    def expired(self) -> bool:
        """Return whether the grace period is over: attempts must hand back now."""
        return self._deadline is not None and time.monotonic() >= self._deadline

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking early when a drain is requested; return whether draining."""
        return self._event.wait(seconds)

    def reset(self) -> None:
        """Forget the request (tests)."""
        self._deadline = None
        self._event.clear()


drain = Drain()
