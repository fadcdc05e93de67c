"""Webhook test parts: a real receiver on loopback that records every request and answers as
scripted, and `deliver_all`, which runs the webhooks queue in the test's process."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rq import Queue, SimpleWorker
from rq.registry import ScheduledJobRegistry
from rq.serializers import JSONSerializer
from sqlalchemy import update
from standardwebhooks.webhooks import Webhook

from tests.helpers import redis_conn
from webapp import outbox
from webapp.extensions import db
from webapp.models import utcnow
from webapp.webhook_models import WebhookDelivery


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def verify(self, secret: str) -> dict:
        """Verify the delivery as a user's receiver would (the standardwebhooks package); return the payload."""
        return Webhook(secret).verify(self.body, self.headers)


@dataclass
class Receiver:
    """Answers each request with the next scripted (status, headers, delay), then 204s."""

    script: list[tuple[int, dict, float]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)

    def start(self) -> Receiver:
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def answer(self, *steps: tuple[int, dict, float] | int) -> None:
        """Script the next answers: a status code, or (status, headers, seconds to wait first)."""
        self.script.extend(step if isinstance(step, tuple) else (step, {}, 0.0) for step in steps)

    def wait_for(self, count: int, timeout: float = 10) -> list[Received]:
        """Wait until `count` requests have arrived; return them all."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.received) < count and time.monotonic() < deadline:
                self._arrived.wait(max(0.01, deadline - time.monotonic()))
            return list(self.received)

    def _take(self, request: Received) -> tuple[int, dict, float]:
        with self._arrived:
            self.received.append(request)
            self._arrived.notify_all()
            return self.script.pop(0) if self.script else (204, {}, 0.0)


def _handler(receiver: Receiver):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, headers, delay = receiver._take(Received(self.path, dict(self.headers.items()), body))
            if delay:
                time.sleep(delay)
            try:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()
            except OSError:
                pass  # the sender gave up waiting

    return Handler


def deliver_all(app, rounds: int = 10) -> None:
    """Run the webhooks queue in this process, moving retries (scheduled jobs) onto it too."""
    connection = redis_conn()
    queue = Queue(outbox.QUEUE, connection=connection, serializer=JSONSerializer)
    with app.app_context():
        for _ in range(rounds):
            SimpleWorker([queue], connection=connection, serializer=JSONSerializer).work(
                burst=True, logging_level="WARNING"
            )
            registry = ScheduledJobRegistry(queue=queue)
            due = registry.get_job_ids()
            if not due:
                break
            for job_id in due:
                registry.remove(job_id)
                queue.enqueue_job(queue.fetch_job(job_id))
            # A retry is due later: make it due now, as time passing would.
            db.session.execute(update(WebhookDelivery).values(next_attempt_at=utcnow()))
            db.session.commit()
        db.session.remove()
