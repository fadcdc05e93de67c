"""Webhook delivery latency: from the commit that finishes a task to its signed delivery arriving.

    .venv/bin/python -m bench.webhook_latency [--tasks 200] [--rate 20]

A real webhook worker process (`flask --app wsgi worker webhooks`, WEBHOOK_CONCURRENCY threads)
serves the `webhooks` queue; a receiver on loopback verifies each delivery with the
`standardwebhooks` package and notes when it arrived. The bench claims `--tasks` tasks, then
completes them at `--rate` a second through the lifecycle's own final write
(`webapp.lifecycle.attempts.complete`: one transaction changes the row and writes its outbox
rows, `hooks._finished`), noting when each commit returned. No task worker runs.

Baseline, in this run: the same bodies POSTed straight to the receiver from this process (the
bare cost of an HTTP request on loopback), so the difference is what the outbox, the queue and
the worker add.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook

from bench.common import DATABASE_URL, REDIS_URL, ROOT, env, percentiles, reset_database, user_token


class Receiver:
    """Verifies each delivery and notes when the task it tells of arrived."""

    def __init__(self):
        self.secret = ""
        self.arrived: dict[int, float] = {}
        self.bad = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                now = time.time()
                try:
                    event = Webhook(receiver.secret).verify(body, dict(self.headers.items()))
                    with receiver.lock:
                        receiver.arrived.setdefault(event["data"]["id"], now)
                except Exception:
                    receiver.bad += 1
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="tasks finished per second")
    args = parser.parse_args()

    reset_database()
    token = user_token("hooks")
    os.environ.update(DATABASE_URL=DATABASE_URL, REDIS_URL=REDIS_URL, SECRET_KEY="bench", WEBHOOK_ALLOW_LOOPBACK="true")
    from webapp import create_app, outbox
    from webapp.extensions import db
    from webapp.lifecycle import attempts
    from webapp.models import User
    from webapp.services import tasks, webhooks

    app = create_app({"RATELIMIT_ENABLED": False})
    receiver = Receiver()
    with app.app_context():
        user = db.session.scalar(db.select(User).where(User.username == "hooks"))
        form = webhooks.validate(receiver.url, ["task.completed"])
        _, receiver.secret = webhooks.create_endpoint(user, form)
        ids = []
        for n in range(args.tasks):
            task, _ = tasks.submit(user, tasks.validate_submission(f"bench {n}", model="local"))
            ids.append(task.id)
        db.session.remove()
        claims = [attempts.claim(task_id) for task_id in ids]  # as workers would, before the clock starts
    del token

    # Baseline: the same kind of body, POSTed straight to the receiver.
    body = outbox.payload("task.completed", {"id": 0, "result": "x" * 200})
    direct = []
    for _ in range(args.tasks):
        start = time.perf_counter()
        request = urllib.request.Request(receiver.url, data=body.encode(), method="POST")
        with contextlib.suppress(OSError):  # unsigned: the receiver counts it bad and still answers
            urllib.request.urlopen(request, timeout=10).read()
        direct.append((time.perf_counter() - start) * 1000)
    receiver.bad = 0

    worker = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "wsgi", "worker", "webhooks"],
        cwd=ROOT,
        env=env(WEBHOOK_ALLOW_LOOPBACK="true", LOG_LEVEL=os.environ.get("WORKER_LOG_LEVEL", "WARNING")),
    )
    try:
        time.sleep(5)  # the worker is up and waiting on its queue
        committed: dict[int, float] = {}
        with app.app_context():
            for claim in claims:
                started = time.monotonic()
                if not attempts.complete(claim, "The capital of France is Paris.", 12, 8, "stop"):
                    raise SystemExit(f"task {claim.task_id} did not complete")
                committed[claim.task_id] = time.time()
                time.sleep(max(0.0, 1 / args.rate - (time.monotonic() - started)))
        deadline = time.monotonic() + 60
        while len(receiver.arrived) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        worker.terminate()
        worker.wait(60)
    latencies = [(receiver.arrived[i] - committed[i]) * 1000 for i in ids if i in receiver.arrived]
    if len(latencies) < len(ids) or receiver.bad:
        missing = sorted(set(ids) - set(receiver.arrived))[:10]
        raise SystemExit(f"{len(ids) - len(latencies)} missing (e.g. {missing}), {receiver.bad} failed verification")
    d, b = percentiles(latencies), percentiles(direct)
    threads = app.config["WEBHOOK_CONCURRENCY"]
    print(
        f"webhook delivery after completion: {args.tasks} tasks finished at {args.rate:g}/s, one webhook worker "
        f"process ({threads} threads), a receiver on loopback verifying each with standardwebhooks"
    )
    print(f"{'':46} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    print(f"{'baseline: POST straight to the receiver':46} {b['p50']:8.1f} {b['p90']:8.1f} {b['p99']:8.1f}")
    print(f"{'commit -> delivery verified at the receiver':46} {d['p50']:8.1f} {d['p90']:8.1f} {d['p99']:8.1f}")
    print(json.dumps({"p50_ms": round(d["p50"], 1), "p99_ms": round(d["p99"], 1)}))


if __name__ == "__main__":
    main()
