"""Page poll latency: 50 browsers watching running tasks, vs a minimal one-row-read Flask endpoint.

    .venv/bin/python -m bench.poll_latency [--pollers 50] [--seconds 30]

What a poll is: GET /tasks/<id>/live with a signed-in session cookie and `HX-Request`, exactly
what htmx sends every second while a task runs; the answer is the task's partial with ~2 KB of
text so far. A writer appends to every task once a second meanwhile, as streaming workers do.

Paced pass (the figure that matters): 50 pollers, each waiting 1 s after an answer before asking
again (htmx's `load delay:1s`), started at random moments within the first second; run by
bench/pollers.py in a process of its own. Flat-out pass (the ceiling): `wrk` (Debian's package,
`apt-get install -y wrk`) with bench/poll.lua, 50 connections asking back to back.

Both servers run under gunicorn with `make run`'s settings (2 workers x 8 threads) on the same
PostgreSQL, in this run:

- baseline: `GET /rows/<id>` of bench/baseline_app.py, one ORM read returned as escaped HTML;
- product: the real partial (session cookie, user load, the ownership check, the Jinja partial).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from urllib.parse import urlencode

import psycopg2

from bench.common import DATABASE_URL, ROOT, gunicorn, reset_database, user_token

PASSWORD = "bench-password"
TEXT = ("The answer so far, a few words at a time, as the model streams it. " * 30).strip()
GUNICORN = {"workers": 2, "threads": 8}


def sign_in(port: int, username: str) -> str:
    """Sign in through the login form; return the session cookie as a Cookie header value."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/login")
    response = conn.getresponse()
    html = response.read().decode()
    cookie = response.getheader("Set-Cookie").split(";", 1)[0]
    token = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
    body = urlencode({"username": username, "password": PASSWORD, "csrf_token": token})
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie}
    conn.request("POST", "/login", body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    if response.status != 302:
        raise RuntimeError(f"sign-in answered {response.status}")
    return response.getheader("Set-Cookie").split(";", 1)[0]


def running_tasks(token: str, port: int, count: int) -> list[int]:
    """Submit `count` tasks through the API and make them look mid-answer (no worker runs)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    ids = []
    for n in range(count):
        body = json.dumps({"prompt": f"Tell me about poll number {n}."})
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        conn.request("POST", "/api/v1/tasks", body=body, headers=headers)
        response = conn.getresponse()
        ids.append(json.loads(response.read())["id"])
    with psycopg2.connect(DATABASE_URL) as db, db.cursor() as cur:
        cur.execute(
            "UPDATE tasks SET status = 'PROCESSING', progress = 40, result = %s, attempts = 1, started_at = now()"
            " WHERE id = ANY(%s)",
            (TEXT, ids),
        )
    return ids


def baseline_rows(count: int) -> list[int]:
    """Create the baseline's table (before its server starts: two workers would race) and fill it."""
    from bench.baseline_app import create_tables

    create_tables(DATABASE_URL)
    with psycopg2.connect(DATABASE_URL) as db, db.cursor() as cur:
        cur.execute(
            "INSERT INTO baseline_poll_rows (status, progress, result)"
            " SELECT 'PROCESSING', 40, %s FROM generate_series(1, %s) RETURNING id",
            (TEXT, count),
        )
        return sorted(row[0] for row in cur.fetchall())


@contextmanager
def writer(statement: str):
    """Run `statement` once a second while the pollers read, as streaming workers write."""
    stop = threading.Event()

    def run():
        # Not `with connect() as db`: since psycopg2 2.9 that block is one transaction even in
        # autocommit, and no write would be seen before the end.
        db = psycopg2.connect(DATABASE_URL)
        db.autocommit = True
        try:
            with db.cursor() as cur:
                while not stop.wait(1.0):
                    cur.execute(statement)
        finally:
            db.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


WRITE_TASKS = (
    "UPDATE tasks SET result = result || ' more', progress = LEAST(progress + 1, 99), updated_at = now()"
    " WHERE status = 'PROCESSING'"
)
WRITE_ROWS = "UPDATE baseline_poll_rows SET result = result || ' more', progress = LEAST(progress + 1, 99)"


def paced(port: int, path: str, ids: list[int], pollers: int, seconds: int, expect: str, cookie: str = "") -> dict:
    """Run bench/pollers.py (a separate process); return its summary."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.pollers",
            str(port),
            path,
            str(ids[0]),
            str(len(ids)),
            "--pollers",
            str(pollers),
            "--seconds",
            str(seconds),
            "--cookie",
            cookie,
            "--expect",
            expect,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["bad_answers"]:
        raise RuntimeError(f"{path}: {result['bad_answers']} bad answers, e.g. {result['first_bad']}")
    return result


def flat_out(port: int, path: str, ids: list[int], pollers: int, seconds: int, expect: str, cookie: str = "") -> dict:
    """Run wrk with bench/poll.lua, every connection asking back to back; return its summary."""
    env = {
        **os.environ,
        "POLL_PATH": path,
        "POLL_FIRST": str(ids[0]),
        "POLL_COUNT": str(len(ids)),
        "POLL_COOKIE": cookie,
        "POLL_EXPECT": expect,
    }
    done = subprocess.run(
        [
            "wrk",
            "--threads",
            "2",
            "--connections",
            str(pollers),
            "--duration",
            f"{seconds}s",
            "--timeout",
            "10s",
            "--script",
            str(ROOT / "bench" / "poll.lua"),
            f"http://127.0.0.1:{port}",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["bad_answers"] or result["socket_errors"]:
        raise RuntimeError(f"{path}: {result['bad_answers']} bad answers, {result['socket_errors']} socket errors")
    return result


def rate(result: dict) -> float:
    return result["requests"] / result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pollers", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=30, help="length of each paced run")
    parser.add_argument("--flat-out-seconds", type=int, default=10, help="length of each closed-loop run")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")

    reset_database()
    token = user_token("poller")  # its password is bench.common's, PASSWORD here
    results: dict[str, dict] = {}
    live = "/tasks/%d/live?seen=PROCESSING"
    # Product first: its tasks are submitted through its own API, then signed in as their owner.
    with gunicorn("wsgi:app", **GUNICORN) as port:
        ids = running_tasks(token, port, args.pollers)
        cookie = sign_in(port, "poller")
        with writer(WRITE_TASKS):
            flat_out(port, live, ids, args.pollers, 3, "Processing", cookie)  # warm-up
            results["product paced"] = paced(port, live, ids, args.pollers, args.seconds, "Processing", cookie)
            results["product flat out"] = flat_out(
                port, live, ids, args.pollers, args.flat_out_seconds, "Processing", cookie
            )
    rows = baseline_rows(args.pollers)
    with gunicorn("bench.baseline_app:app", **GUNICORN) as port, writer(WRITE_ROWS):
        flat_out(port, "/rows/%d", rows, args.pollers, 3, "PROCESSING")  # warm-up
        results["baseline paced"] = paced(port, "/rows/%d", rows, args.pollers, args.seconds, "PROCESSING")
        results["baseline flat out"] = flat_out(
            port, "/rows/%d", rows, args.pollers, args.flat_out_seconds, "PROCESSING"
        )

    print(
        f"page poll latency: {args.pollers} pollers, each asking again 1 s after an answer (htmx's load delay:1s),"
        f" {args.seconds} s; flat out: wrk, {args.pollers} connections back to back, {args.flat_out_seconds} s;"
        f" gunicorn {GUNICORN['workers']} workers x {GUNICORN['threads']} threads"
    )
    print(f"{'':44} {'polls/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    labels = {
        "baseline paced": "baseline: one-row read, paced",
        "product paced": "GET /tasks/<id>/live, paced",
        "baseline flat out": "baseline: one-row read, flat out",
        "product flat out": "GET /tasks/<id>/live, flat out",
    }
    for key, label in labels.items():
        r = results[key]
        print(f"{label:44} {rate(r):8.0f} {r['p50_ms']:8.2f} {r['p90_ms']:8.2f} {r['p99_ms']:8.2f} {r['max_ms']:8.2f}")
    base, product = results["baseline paced"], results["product paced"]
    base_max, product_max = results["baseline flat out"], results["product flat out"]
    print(
        f"ratio baseline/product, paced p50: {base['p50_ms'] / product['p50_ms']:.2f}  "
        f"p99: {base['p99_ms'] / product['p99_ms']:.2f};  "
        f"flat-out throughput: {rate(product_max) / rate(base_max):.2f} of the baseline's"
    )


if __name__ == "__main__":
    main()
