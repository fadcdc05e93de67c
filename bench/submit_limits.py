"""What the per-user limits cost a submission: POST /api/v1/tasks with the limits off, then on.

    .venv/bin/python -m bench.submit_limits [--requests 300]

With the limits on, each submission also counts the user's unfinished tasks (an index scan that
stops at MAX_TASKS_IN_FLIGHT) and records itself in the user's moving window in Redis (one
round trip running the `limits` library's Lua script). The limits are set high enough that
nothing is refused, and the submissions rotate over three users so none reaches the default
cap of 100 tasks in flight (no worker runs, so every task stays PENDING): every request pays
the full price of both checks. The passes alternate, under gunicorn with the same settings, on
the same PostgreSQL and Redis (reset before each), in this run; the limits-off passes are the
baseline.
"""

from __future__ import annotations

import argparse
import http.client
import json
import time

from bench.common import gunicorn, percentiles, reset_database, user_token

USERS = 3
ROUNDS = 3


def timed_posts(port: int, tokens: list[str], count: int) -> list[float]:
    """POST `count` prompts, rotating over the tokens, on one keep-alive connection; return ms each."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies = []
    for i in range(count):
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {tokens[i % len(tokens)]}"}
        body = json.dumps({"prompt": f"What is {i} + {i}?"})
        start = time.perf_counter()
        conn.request("POST", "/api/v1/tasks", body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        latencies.append((time.perf_counter() - start) * 1000)
        if response.status != 202:
            raise RuntimeError(f"POST /api/v1/tasks answered {response.status}")
    conn.close()
    return latencies


def run(limits: bool, requests: int, warmup: int) -> list[float]:
    reset_database()
    tokens = [user_token(f"bench{n}") for n in range(USERS)]
    settings = {"RATELIMIT_ENABLED": "true", "SUBMIT_LIMIT": "1000000/minute"} if limits else {}
    with gunicorn("wsgi:app", **settings) as port:
        return timed_posts(port, tokens, requests + warmup)[warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=15)
    args = parser.parse_args()
    assert (args.requests // ROUNDS + args.warmup) / USERS < 100, "each user must stay under MAX_TASKS_IN_FLIGHT"

    # Alternated, so neither side gets the quieter moments of a shared machine.
    results: dict[str, list[float]] = {"baseline: limits off": [], "limits on (per minute + in flight)": []}
    for _ in range(ROUNDS):
        for limits, name in zip((False, True), results, strict=True):
            results[name] += run(limits, args.requests // ROUNDS, args.warmup)
    print(
        f"submission with rate limits: {args.requests} sequential POSTs over {USERS} users, "
        f"{ROUNDS} rounds each way, alternated; gunicorn 1 worker x 4 threads"
    )
    print(f"{'':36} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    stats = {name: percentiles(values) for name, values in results.items()}
    for name, s in stats.items():
        print(f"{name:36} {s['p50']:8.2f} {s['p90']:8.2f} {s['p99']:8.2f} {s['mean']:8.2f}")
    base, limited = stats.values()
    print(
        f"ratio baseline/limited (p50): {base['p50'] / limited['p50']:.2f}  (p99): {base['p99'] / limited['p99']:.2f}"
        "   (1.0 = the limits cost nothing)"
    )


if __name__ == "__main__":
    main()
