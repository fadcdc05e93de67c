"""Stats page with a million tasks: GET /admin, its live partial and /metrics vs GET one task.

    .venv/bin/python -m bench.admin_stats [--tasks 1000000] [--requests 40] [--keep]

Seeds the bench database (BENCH_DATABASE_URL) with N tasks spread over the last 7 days (the
retention period) in one INSERT ... SELECT generate_series, runs VACUUM ANALYZE (what
autovacuum does after a bulk load), then times each page under gunicorn against a baseline
measured in the same run: GET /api/v1/tasks/<id>, a one-row read through the same app.
--keep reuses an already seeded database of the right size.
"""

from __future__ import annotations

import argparse
import http.client
import re
import time

import psycopg2

from bench.common import DATABASE_URL, flask, gunicorn, percentiles, reset_database

SEED = """
INSERT INTO users (username, password_hash, is_admin, is_active, created_at)
SELECT 'user' || g, 'x', false, true, now() FROM generate_series(1, 200) AS g;

-- Finished tasks, oldest first, spread evenly over the last 7 days; a handful still unfinished.
INSERT INTO tasks (user_id, prompt, model, priority, params, status, progress, result, error, error_kind,
                   attempts, max_attempts, prompt_tokens, completion_tokens, job_id, created_at,
                   started_at, finished_at, updated_at)
SELECT
  1 + (g * 7919) %% 200,
  'Seeded prompt number ' || g,
  (ARRAY['local', 'gpt-4o-mini', 'llama3'])[1 + g %% 3],
  1 + g %% 10,
  '{}'::jsonb,
  s.status,
  CASE WHEN s.status = 'COMPLETED' THEN 100 ELSE 0 END,
  CASE WHEN s.status = 'COMPLETED' THEN 'Seeded answer ' || g END,
  CASE WHEN s.status = 'FAILED' THEN 'The provider answered 429.' END,
  CASE WHEN s.status = 'FAILED' THEN (ARRAY['rate_limited', 'timeout', 'provider', 'invalid_request'])[1 + g %% 4]
       WHEN s.status = 'CANCELLED' THEN 'cancelled' END,
  1, 3,
  CASE WHEN s.status = 'COMPLETED' THEN 20 + g %% 200 END,
  CASE WHEN s.status = 'COMPLETED' THEN 10 + g %% 500 END,
  'task-' || g || '-seed',
  t.created,
  t.created + t.wait,
  CASE WHEN s.status IN ('PENDING', 'PROCESSING') THEN NULL ELSE t.created + t.wait + t.run END,
  t.created + t.wait + t.run
FROM generate_series(1::bigint, %(n)s) AS g
CROSS JOIN LATERAL (SELECT
  now() - interval '7 days' * (1 - g::float8 / %(n)s) - interval '5 minutes' AS created,
  interval '1 millisecond' * (50 + (g * 37) %% 4000) AS wait,
  interval '1 millisecond' * (500 + (g * 101) %% 20000) AS run) AS t
CROSS JOIN LATERAL (SELECT CASE
  WHEN g > %(n)s - 50 THEN 'PENDING'
  WHEN g > %(n)s - 60 THEN 'PROCESSING'
  WHEN g %% 20 = 0 THEN 'FAILED'
  WHEN g %% 33 = 0 THEN 'CANCELLED'
  ELSE 'COMPLETED' END AS status) AS s;
"""


def seed(n: int) -> float:
    """Fill the bench database with `n` tasks; return the seconds it took."""
    start = time.perf_counter()
    conn = psycopg2.connect(DATABASE_URL)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(SEED, {"n": n})
        cur.execute("VACUUM ANALYZE tasks")
        cur.execute("VACUUM ANALYZE users")
    conn.close()
    return time.perf_counter() - start


def task_count() -> int:
    try:
        conn = psycopg2.connect(DATABASE_URL)
    except psycopg2.OperationalError:
        return 0
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM tasks")
            return cur.fetchone()[0]
    except psycopg2.Error:
        return 0
    finally:
        conn.close()


class Session:
    """A browser-like session on one keep-alive connection: cookies, and the CSRF token."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, body: str | None = None, headers: dict | None = None):
        headers = dict(headers or {})
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        for value in response.headers.get_all("Set-Cookie") or ():
            name, _, rest = value.partition("=")
            self.cookies[name] = rest.split(";", 1)[0]
        return response.status, data

    def login(self, username: str, password: str) -> None:
        _, page = self.request("GET", "/login")
        token = re.search(rb'name="csrf_token" value="([^"]+)"', page).group(1).decode()
        form = f"username={username}&password={password}&csrf_token={token}"
        status, _ = self.request("POST", "/login", form, {"Content-Type": "application/x-www-form-urlencoded"})
        if status != 302:
            raise RuntimeError(f"login answered {status}")

    def timed(self, path: str, count: int, headers: dict | None = None) -> list[float]:
        latencies = []
        for _ in range(count):
            start = time.perf_counter()
            status, _ = self.request("GET", path, headers=headers)
            latencies.append((time.perf_counter() - start) * 1000)
            if status != 200:
                raise RuntimeError(f"GET {path} answered {status}")
        return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="reuse the seeded database if it has --tasks tasks")
    args = parser.parse_args()

    if args.keep and task_count() == args.tasks:
        print(f"reusing {args.tasks:,} seeded tasks in {DATABASE_URL}")
        flask("db", "upgrade")
    else:
        reset_database()
        print(f"seeded {args.tasks:,} tasks in {seed(args.tasks):.1f} s (INSERT ... SELECT generate_series + VACUUM)")
    conn = psycopg2.connect(DATABASE_URL)
    with conn.cursor() as cur:
        cur.execute("DELETE FROM users WHERE username = 'bench-admin'")
        conn.commit()
    conn.close()
    flask("users", "create", "bench-admin", "--admin", "--password-stdin", stdin="bench-password\n")
    token = flask("tokens", "create", "bench-admin").strip().splitlines()[-1]
    auth = {"Authorization": f"Bearer {token}"}
    metrics_auth = {"Authorization": "Bearer bench-metrics"}

    paths = {
        "baseline: GET /api/v1/tasks/1": ("/api/v1/tasks/1", auth),
        "GET /admin (whole page)": ("/admin", None),
        "GET /admin/stats (htmx partial)": ("/admin/stats", None),
        "GET /metrics": ("/metrics", metrics_auth),
    }
    results = {}
    with gunicorn("wsgi:app", workers=1, threads=4, METRICS_TOKEN="bench-metrics") as port:
        session = Session(port)
        session.login("bench-admin", "bench-password")
        for path, headers in paths.values():
            session.timed(path, args.warmup, headers)
        # Interleaved rounds, so a noisy neighbour slows every path alike.
        for name in paths:
            results[name] = []
        for _ in range(args.requests):
            for name, (path, headers) in paths.items():
                results[name] += session.timed(path, 1, headers)

    print(
        f"stats page with {args.tasks:,} tasks: {args.requests} requests each, interleaved, one keep-alive "
        "connection, gunicorn 1 worker x 4 threads"
    )
    print(f"{'':34} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    stats = {name: percentiles(values) for name, values in results.items()}
    for name, s in stats.items():
        print(f"{name:34} {s['p50']:8.2f} {s['p90']:8.2f} {s['p99']:8.2f} {s['mean']:8.2f}")
    base = stats["baseline: GET /api/v1/tasks/1"]["p50"]
    for name, s in list(stats.items())[1:]:
        print(f"{name:34} {s['p50'] / base:6.1f} x the baseline (p50)")


if __name__ == "__main__":
    main()
