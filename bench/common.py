"""Shared set-up for benchmarks: a bench database, servers under gunicorn, a user and a token."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import psycopg2
from redis import Redis

ROOT = Path(__file__).resolve().parent.parent
DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://root@127.0.0.1:5432/atr_bench")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")


def env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": DATABASE_URL,
        "REDIS_URL": REDIS_URL,
        "SECRET_KEY": "bench",
        "RATELIMIT_ENABLED": "false",
        "PYTHONPATH": str(ROOT),
        **extra,
    }


def reset_database() -> None:
    """Create the bench database if needed, empty it, and apply the migrations."""
    base, _, name = DATABASE_URL.rpartition("/")
    admin = psycopg2.connect(f"{base}/postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cur.fetchone() is None:
            cur.execute(f'CREATE DATABASE "{name}"')
    admin.close()
    conn = psycopg2.connect(DATABASE_URL)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    conn.close()
    Redis.from_url(REDIS_URL).flushdb()
    flask("db", "upgrade")


def flask(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", *args],
        cwd=ROOT,
        env=env(),
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def user_token(name: str = "bench") -> str:
    flask("users", "create", name, "--password-stdin", stdin="bench-password\n")
    return flask("tokens", "create", name).strip().splitlines()[-1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def gunicorn(app: str, workers: int = 1, threads: int = 4, project_config: bool = False, **extra_env: str):
    """Serve `app` (module:variable) on a free port; yield the port.

    With `project_config`, gunicorn.conf.py decides workers and threads, as under `make run`.
    """
    port = free_port()
    if project_config:
        sizing = ["--config", str(ROOT / "gunicorn.conf.py")]
    else:
        sizing = ["--workers", str(workers), "--threads", str(threads)]
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", app, "--bind", f"127.0.0.1:{port}", *sizing, "--log-level", "warning"],
        cwd=ROOT,
        env=env(**extra_env),
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(20)


def timed_posts(port: int, path: str, bodies: list[dict], headers: dict[str, str]) -> list[float]:
    """POST each body in turn on one keep-alive connection; return the latencies in ms."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies = []
    for body in bodies:
        data = json.dumps(body)
        start = time.perf_counter()
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        response.read()
        latencies.append((time.perf_counter() - start) * 1000)
        if response.status != 202:
            raise RuntimeError(f"POST {path} answered {response.status}")
    conn.close()
    return latencies


def percentiles(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "p50": statistics.median(values),
        "p90": cuts[89],
        "p95": cuts[94],
        "p99": cuts[98],
        "mean": statistics.fmean(values),
    }


def users_with_tokens(count: int, prefix: str = "load") -> list[str]:
    """Create `count` users with one API token each, straight in the database; return the tokens.

    What `flask users create` + `flask tokens create` store, without 2 x `count` CLI start-ups.
    The users have no usable password (API only).
    """
    tokens = ["atr_" + secrets.token_urlsafe(32) for _ in range(count)]
    conn = psycopg2.connect(DATABASE_URL)
    with conn, conn.cursor() as cur:
        for n, token in enumerate(tokens):
            cur.execute(
                "INSERT INTO users (username, password_hash, is_admin, is_active, created_at)"
                " VALUES (%s, 'x', false, true, now()) RETURNING id",
                (f"{prefix}{n}",),
            )
            user_id = cur.fetchone()[0]
            cur.execute(
                "INSERT INTO api_tokens (user_id, name, prefix, token_hash, created_at)"
                " VALUES (%s, 'bench', %s, %s, now())",
                (user_id, token[:10], hashlib.sha256(token.encode()).hexdigest()),
            )
    conn.close()
    return tokens


def server_cpu_seconds(port: int) -> float:
    """Return the CPU time (user + system) used so far by the processes serving 127.0.0.1:`port`."""
    needle = f"127.0.0.1:{port}".encode()
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle in (proc / "cmdline").read_bytes():
                fields = (proc / "stat").read_text().rpartition(")")[2].split()
                total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except OSError:
            continue
    return total


def require_wrk() -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: `make bench` installs it, or apt-get install -y wrk")


def wrk(
    port: int,
    paths: list[str],
    *,
    connections: int,
    seconds: float,
    method: str = "GET",
    body: str | None = None,
    tokens: list[str] = (),
    cookie: str = "",
    expect: int = 200,
    threads: int = 2,
) -> dict:
    """Run wrk with bench/load.lua against 127.0.0.1:`port`, rotating `paths` and `tokens`; return its summary.

    The summary has requests, seconds, p50/p90/p95/p99/max_ms, socket_errors, non_2xx,
    unexpected (answers whose status is not `expect`), rate (per second) and cpu_ms: the server
    processes' CPU time per request (gunicorn's Python only, not PostgreSQL's or Redis's).
    """
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        paths_file, tokens_file = Path(tmp, "paths"), Path(tmp, "tokens")
        paths_file.write_text("\n".join(paths) + "\n")
        tokens_file.write_text("\n".join(tokens) + "\n")
        load_env = {
            **os.environ,
            "LOAD_METHOD": method,
            "LOAD_PATHS": str(paths_file),
            "LOAD_TOKENS": str(tokens_file),
            "LOAD_COOKIE": cookie,
            "LOAD_EXPECT": str(expect),
        }
        if body is not None:
            load_env["LOAD_BODY"] = body
        cpu_before = server_cpu_seconds(port)
        done = subprocess.run(
            [
                "wrk",
                "--threads",
                str(min(threads, connections)),
                "--connections",
                str(connections),
                "--duration",
                f"{seconds}s",
                "--timeout",
                "10s",
                "--script",
                str(ROOT / "bench" / "load.lua"),
                f"http://127.0.0.1:{port}",
            ],
            env=load_env,
            capture_output=True,
            text=True,
            check=True,
        )
        cpu = server_cpu_seconds(port) - cpu_before
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["rate"] = result["requests"] / result["seconds"]
    result["cpu_ms"] = cpu * 1000 / max(result["requests"], 1)
    return result
