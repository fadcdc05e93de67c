"""Submit latency: N sequential POST /api/v1/tasks vs a minimal insert+enqueue Flask endpoint.

    .venv/bin/python -m bench.submit_latency [--requests 200]

Both run under gunicorn with the same settings, on the same PostgreSQL and Redis, in this run.
"""

from __future__ import annotations

import argparse

from bench.common import gunicorn, percentiles, reset_database, timed_posts, user_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()

    reset_database()
    token = user_token()
    bodies = [{"prompt": f"What is {i} + {i}?"} for i in range(args.requests + args.warmup)]
    results = {}
    with gunicorn("bench.baseline_app:app") as port:
        results["baseline: insert + enqueue"] = timed_posts(port, "/submit", bodies, {})[args.warmup :]
    with gunicorn("wsgi:app") as port:
        auth = {"Authorization": f"Bearer {token}"}
        results["POST /api/v1/tasks"] = timed_posts(port, "/api/v1/tasks", bodies, auth)[args.warmup :]

    print(f"submit latency: {args.requests} sequential POSTs, one keep-alive connection, gunicorn 1 worker x 4 threads")
    print(f"{'':32} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    stats = {name: percentiles(values) for name, values in results.items()}
    for name, s in stats.items():
        print(f"{name:32} {s['p50']:8.2f} {s['p90']:8.2f} {s['p99']:8.2f} {s['mean']:8.2f}")
    base, product = stats["baseline: insert + enqueue"], stats["POST /api/v1/tasks"]
    print(
        f"ratio baseline/product (p50): {base['p50'] / product['p50']:.2f}  "
        f"(p99): {base['p99'] / product['p99']:.2f}   (1.0 = as fast as the bare insert+enqueue)"
    )


if __name__ == "__main__":
    main()
