"""Reads with a million tasks in PostgreSQL: history page, API list (first and deep page), one-task poll.

    .venv/bin/python -m bench.reads [--tasks 1000000] [--seconds 5] [--requests 200] [--keep]

Seeds the bench database with bench/admin_stats.py's INSERT ... SELECT generate_series (N tasks
over 200 users, ~5,000 each), then reads as `user1` (a session cookie for the page, a bearer
token for the API):

- GET /tasks: the History page, newest 20 (the whole HTML page);
- GET /api/v1/tasks: the API's first page (20);
- GET /api/v1/tasks?cursor=...: a page 4,000 tasks deep into user1's tasks (cursor pagination);
- GET /api/v1/tasks/<id>: one task (a poll), rotating over 1,000 of user1's tasks picked at random;
- baseline: GET /rows/<id> of bench/baseline_app.py, one ORM read of a one-row table, as HTML.

Two measures, both against the same two servers under gunicorn with `make run`'s settings
(2 workers x 8 threads), both servers up together:

- latency: paced sequential requests on one keep-alive connection, the paths interleaved round
  by round (--requests each), so a noisy neighbour slows every path alike; p50/p95/p99;
- flat out: wrk (bench/load.lua), 16 connections back to back, --seconds per pass, two passes
  per path, the order turned round on the second; with the CPU time gunicorn's processes spent
  per request (from /proc; PostgreSQL's share is not in it).
"""

from __future__ import annotations

import argparse
import hashlib
import secrets

import psycopg2
from werkzeug.security import generate_password_hash

from bench.admin_stats import Session, seed, task_count
from bench.common import DATABASE_URL, flask, gunicorn, percentiles, require_wrk, reset_database, wrk

GUNICORN = {"workers": 2, "threads": 8}
USER, PASSWORD = "user1", "bench-password"
CONNECTIONS = 16
DEEP = 4_000


def prepare(n_tasks: int, keep: bool) -> tuple[str, list[int], str, list[int]]:
    """Seed (or reuse) the tasks; return user1's token, poll ids, a deep cursor, and baseline row ids."""
    from bench.baseline_app import create_tables
    from webapp.services.tasks import encode_cursor

    if keep and task_count() == n_tasks:
        print(f"reusing {n_tasks:,} seeded tasks in {DATABASE_URL}")
        flask("db", "upgrade")
    else:
        reset_database()
        print(f"seeded {n_tasks:,} tasks in {seed(n_tasks):.1f} s (INSERT ... SELECT generate_series + VACUUM)")
    create_tables(DATABASE_URL)
    token = "atr_" + secrets.token_urlsafe(32)
    conn = psycopg2.connect(DATABASE_URL)
    with conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE users SET password_hash = %s WHERE username = %s RETURNING id",
            (generate_password_hash(PASSWORD), USER),
        )
        user_id = cur.fetchone()[0]
        cur.execute("DELETE FROM api_tokens WHERE user_id = %s", (user_id,))
        cur.execute(
            "INSERT INTO api_tokens (user_id, name, prefix, token_hash, created_at)"
            " VALUES (%s, 'reads', %s, %s, now())",
            (user_id, token[:10], hashlib.sha256(token.encode()).hexdigest()),
        )
        cur.execute("SELECT id FROM tasks WHERE user_id = %s ORDER BY random() LIMIT 1000", (user_id,))
        poll_ids = [row[0] for row in cur.fetchall()]
        cur.execute("SELECT id FROM tasks WHERE user_id = %s ORDER BY id DESC OFFSET %s LIMIT 1", (user_id, DEEP))
        deep_cursor = encode_cursor(cur.fetchone()[0])
        cur.execute("TRUNCATE baseline_poll_rows RESTART IDENTITY")
        cur.execute(
            "INSERT INTO baseline_poll_rows (status, progress, result)"
            " SELECT 'COMPLETED', 100, 'Seeded answer ' || g FROM generate_series(1, 1000) AS g RETURNING id"
        )
        row_ids = [row[0] for row in cur.fetchall()]
    conn.close()
    return token, poll_ids, deep_cursor, row_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=int, default=5, help="length of each wrk pass")
    parser.add_argument("--requests", type=int, default=200, help="paced requests per path")
    parser.add_argument("--keep", action="store_true", help="reuse the seeded database if it has --tasks tasks")
    args = parser.parse_args()
    require_wrk()

    token, poll_ids, deep_cursor, row_ids = prepare(args.tasks, args.keep)
    auth = {"Authorization": f"Bearer {token}"}
    with (
        gunicorn("bench.baseline_app:app", **GUNICORN) as baseline_port,
        gunicorn("wsgi:app", **GUNICORN) as port,
    ):
        session = Session(port)
        session.login(USER, PASSWORD)
        cookie = "; ".join(f"{k}={v}" for k, v in session.cookies.items())
        # name: (port, paths, headers for the paced pass, tokens and cookie for wrk)
        reads = {
            "baseline: GET /rows/<id>": (baseline_port, [f"/rows/{i}" for i in row_ids], None, [], ""),
            "GET /api/v1/tasks/<id> (poll)": (port, [f"/api/v1/tasks/{i}" for i in poll_ids], auth, [token], ""),
            "GET /api/v1/tasks (first page)": (port, ["/api/v1/tasks"], auth, [token], ""),
            f"GET /api/v1/tasks?cursor= ({DEEP:,} deep)": (
                port,
                [f"/api/v1/tasks?cursor={deep_cursor}"],
                auth,
                [token],
                "",
            ),
            "GET /tasks (History page)": (port, ["/tasks"], None, [], cookie),
        }
        sessions = {baseline_port: Session(baseline_port), port: session}
        paced: dict[str, list[float]] = {name: [] for name in reads}
        for round_ in range(args.requests + 10):  # the first 10 rounds warm up
            for name, (p, paths, headers, _, _) in reads.items():
                latency = sessions[p].timed(paths[round_ % len(paths)], 1, headers)
                if round_ >= 10:
                    paced[name] += latency
        flat: dict[str, list[dict]] = {name: [] for name in reads}
        for round_ in range(2):
            for name in list(reads)[:: 1 if round_ == 0 else -1]:
                p, paths, _, tokens, cookie_ = reads[name]
                result = wrk(p, paths, connections=CONNECTIONS, seconds=args.seconds, tokens=tokens, cookie=cookie_)
                if result["unexpected"] or result["socket_errors"]:
                    raise RuntimeError(f"{name}: {result}")
                flat[name].append(result)

    print(
        f"reads with {args.tasks:,} tasks: paced = {args.requests} sequential requests per path, interleaved, one"
        f" keep-alive connection; flat out = wrk, {CONNECTIONS} connections, 2 x {args.seconds} s per path;"
        f" gunicorn {GUNICORN['workers']} workers x {GUNICORN['threads']} threads"
    )
    print(
        f"{'':40} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} | {'req/s':>6} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}"
        f" {'CPU ms/req':>10}"
    )
    summary = {}
    for name in reads:
        cuts = percentiles(paced[name])
        results = flat[name]
        rate = sum(r["requests"] for r in results) / sum(r["seconds"] for r in results)
        wrk_p = {k: sum(r[k] for r in results) / len(results) for k in ("p50_ms", "p95_ms", "p99_ms", "cpu_ms")}
        summary[name] = (cuts, rate, wrk_p["cpu_ms"])
        print(
            f"{name:40} {cuts['p50']:7.2f} {cuts['p95']:7.2f} {cuts['p99']:7.2f} | {rate:6.0f}"
            f" {wrk_p['p50_ms']:7.2f} {wrk_p['p95_ms']:7.2f} {wrk_p['p99_ms']:7.2f} {wrk_p['cpu_ms']:10.2f}"
        )
    base, base_rate, base_cpu = summary["baseline: GET /rows/<id>"]
    poll, poll_rate, poll_cpu = summary["GET /api/v1/tasks/<id> (poll)"]
    print(
        f"poll vs one-row GET: throughput {poll_rate / base_rate:.2f}, latency baseline/poll"
        f" p50 {base['p50'] / poll['p50']:.2f} p95 {base['p95'] / poll['p95']:.2f},"
        f" server CPU per request baseline/poll {base_cpu / poll_cpu:.2f}   (goal: >= 0.7)"
    )
    slow = [name for name, (cuts, _, _) in summary.items() if cuts["p95"] > 50]
    print(f"paced p95 <= 50 ms: {'every path' if not slow else 'missed by ' + ', '.join(slow)}")


if __name__ == "__main__":
    main()
