"""Submissions under load: POST /api/v1/tasks flat out from 16 and 64 connections, vs a bare insert+enqueue.

    .venv/bin/python -m bench.submit_load [--seconds 10] [--rounds 2] [--users 256]

wrk (bench/load.lua) sends POSTs back to back on every connection, on 127.0.0.1. Two servers
run side by side under gunicorn with the same settings (`make run`'s: 2 workers x 8 threads),
on the same PostgreSQL and Redis:

- baseline: `POST /submit` of bench/baseline_app.py, one ORM insert and one RQ enqueue;
- product: `POST /api/v1/tasks` with a bearer token: token lookup, validation, the catalog,
  both per-user limits, the insert, the enqueue, the JSON envelope.

"CPU ms/req" is the CPU time gunicorn's processes spent per answered request during the passes
(from /proc; PostgreSQL's and Redis's share is not in it): unlike the throughput it hardly
depends on what else the shared machine is doing.

The per-user limits stay on and are paid in full: MAX_TASKS_IN_FLIGHT keeps its default (100)
and the requests rotate over --users users with a token each, so no user comes near it;
SUBMIT_LIMIT is raised from 60/minute to 1000/minute for the run (a pass sends tens of
submissions per user). Every answer must be a 202: any other is counted and reported.

With --priced the product's tasks go to a model with prices (no worker runs, so it is never
called) and every user has a budget large enough that nothing is refused: each submission
then pays the whole budget check, its reservation's conditional upsert included. Without it
they go to the free `local` model, whose reservation is nothing (no upsert).

Passes are bounded (--seconds) and alternated, baseline and product, starting with the other
side each round. Between passes the queues are emptied and both tables truncated (no worker
runs), so every pass starts from the same empty state.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import psycopg2
from redis import Redis
from rq import Queue

from bench.baseline_app import create_tables
from bench.common import DATABASE_URL, REDIS_URL, gunicorn, require_wrk, reset_database, users_with_tokens, wrk

GUNICORN = {"workers": 2, "threads": 8}
PRODUCT_ENV = {"RATELIMIT_ENABLED": "true", "SUBMIT_LIMIT": "1000/minute"}
BODY = json.dumps({"prompt": "What is the capital of France?"})
# --priced: a model with prices, never called (no worker runs), and a budget nobody reaches.
PRICED_MODEL = """
[models.priced]
base_url = "http://127.0.0.1:9/v1"
upstream = "priced"
usd_per_million_input_tokens = 2.5
usd_per_million_output_tokens = 10
"""
QUEUES = ("high", "default", "low", "baseline")
SIDES = {"baseline": "baseline: insert + enqueue", "product": "POST /api/v1/tasks"}


def purge() -> None:
    """Empty the queues and both tables, so the next pass starts where the last one did."""
    time.sleep(1.0)  # requests wrk left unanswered at the end of a pass finish first
    redis = Redis.from_url(REDIS_URL)
    for name in QUEUES:
        Queue(name, connection=redis).empty()
    conn = psycopg2.connect(DATABASE_URL)
    with conn, conn.cursor() as cur:
        cur.execute("TRUNCATE task_attempts, tasks, idempotency_keys, usage_months, usage_days, baseline_rows")
    conn.close()


def check(result: dict, label: str) -> dict:
    if result["socket_errors"]:
        raise RuntimeError(f"{label}: {result['socket_errors']} socket errors")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="length of each pass")
    parser.add_argument("--rounds", type=int, default=2, help="passes per side and connection count")
    parser.add_argument("--users", type=int, default=256)
    parser.add_argument("--connections", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--priced", action="store_true", help="submit to a priced model under a budget")
    args = parser.parse_args()
    require_wrk()
    product_env = dict(PRODUCT_ENV)
    if args.priced:
        models = Path(tempfile.mkdtemp(prefix="atr-bench-")) / "models.toml"
        models.write_text(PRICED_MODEL)
        product_env.update(MODELS_FILE=str(models), DEFAULT_MODEL="priced", DEFAULT_MONTHLY_BUDGET_USD="1000000")

    reset_database()
    create_tables(DATABASE_URL)
    tokens = users_with_tokens(args.users)
    runs: dict[tuple[str, int], list[dict]] = {}
    with (
        gunicorn("bench.baseline_app:app", **GUNICORN) as baseline_port,
        gunicorn("wsgi:app", **GUNICORN, **product_env) as product_port,
    ):
        sides = {
            "baseline": dict(port=baseline_port, paths=["/submit"], tokens=[]),
            "product": dict(port=product_port, paths=["/api/v1/tasks"], tokens=tokens),
        }

        def run(side: str, connections: int, seconds: int) -> dict:
            s = sides[side]
            result = wrk(
                s["port"],
                s["paths"],
                connections=connections,
                seconds=seconds,
                method="POST",
                body=BODY,
                tokens=s["tokens"],
                expect=202,
            )
            purge()
            return check(result, f"{side} at {connections} connections")

        for side in sides:  # warm-up: imports, pools, every token's first use
            run(side, max(args.connections), 3)
        for connections in args.connections:
            for round_ in range(args.rounds):
                order = ["baseline", "product"] if round_ % 2 == 0 else ["product", "baseline"]
                for side in order:
                    runs.setdefault((side, connections), []).append(run(side, connections, args.seconds))

    print(
        f"submissions under load: wrk, POST back to back, {args.rounds} passes of {args.seconds} s per side"
        f" and connection count, alternated; gunicorn {GUNICORN['workers']} workers x {GUNICORN['threads']} threads;"
        f" product: {args.users} users, SUBMIT_LIMIT=1000/minute, MAX_TASKS_IN_FLIGHT=100"
        + (", a priced model under a budget (--priced)" if args.priced else "")
    )
    print(
        f"{'':40} {'req/s':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'non-2xx':>8}"
        f" {'CPU ms/req':>10}"
    )
    summary = {}
    for connections in args.connections:
        for side, label in SIDES.items():
            results = runs[(side, connections)]
            s = {
                "rate": sum(r["requests"] for r in results) / sum(r["seconds"] for r in results),
                **{k: statistics.fmean(r[k] for r in results) for k in ("p50_ms", "p90_ms", "p99_ms", "cpu_ms")},
                "max_ms": max(r["max_ms"] for r in results),
                "non_2xx": sum(r["non_2xx"] for r in results),
                "unexpected": sum(r["unexpected"] for r in results),
            }
            summary[(side, connections)] = s
            print(
                f"{label + f', {connections} connections':40} {s['rate']:7.0f} {s['p50_ms']:8.2f} {s['p90_ms']:8.2f}"
                f" {s['p99_ms']:8.2f} {s['max_ms']:8.2f} {s['non_2xx']:8d} {s['cpu_ms']:10.2f}"
            )
    for connections in args.connections:
        base, product = summary[("baseline", connections)], summary[("product", connections)]
        print(
            f"{connections} connections: throughput product/baseline {product['rate'] / base['rate']:.2f},"
            f" latency baseline/product p50 {base['p50_ms'] / product['p50_ms']:.2f}"
            f" p99 {base['p99_ms'] / product['p99_ms']:.2f}; server CPU per request product/baseline"
            f" {product['cpu_ms'] / base['cpu_ms']:.2f}   (1.0 = as fast as the bare insert+enqueue)"
        )
    unexpected = sum(s["unexpected"] for s in summary.values())
    print(f"answers other than 202: {unexpected}")
    if unexpected:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
