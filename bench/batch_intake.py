"""A 50,000-line batch: upload, validation, tasks created and enqueued; its output streamed; a line's worker cost.

Product, measured in one run:
1. Upload: a ~100 MB JSONL file (50,000 lines of ~2 KB: a system and a user message each)
   POSTed to /api/v1/files under gunicorn (the project's config, one process), streamed from
   disk; the web process tree's peak RSS is sampled throughout (every 50 ms).
2. Intake: POST /api/v1/batches, then the wait until the batch is in_progress with its 50,000
   tasks committed and enqueued. One worker takes only the `high` queue (where the intake job
   runs), so the lines stay queued in `low` and are counted there.
3. Output: the tasks are marked COMPLETED by one SQL statement (a stand-in for 50,000 answers,
   each 200 characters), the batch finalized, and GET /files/<output>/content read to its end.
4. Worker cost: LINES tasks from a batch and as many API tasks (the baseline, same prompts,
   same fake provider, in the same run) through one worker; its CPU seconds per task.

    .venv/bin/python -m bench.batch_intake [--lines 50000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg2
from redis import Redis

from .common import DATABASE_URL, REDIS_URL, ROOT, env, gunicorn, reset_database, user_token
from .workers import Memory, fake_provider, models_file, stop_workers

BOUNDARY = "----batchbench"
SYSTEM = "You are a careful assistant. Answer in one short paragraph. " * 8
COST_TASKS = 300


def write_file(path: Path, lines: int) -> int:
    """Write the multipart body (the JSONL file inside) to `path`; return the JSONL's size in bytes."""
    size = 0
    with path.open("wb") as out:
        out.write(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
            "Content-Type: application/jsonl\r\n\r\n".encode()
        )
        for number in range(lines):
            question = f"Question {number}: " + "explain why the sky looks blue at noon and red at dusk. " * 27
            line = {
                "custom_id": f"line-{number}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "fake",
                    "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                    "max_tokens": 32,
                },
            }
            data = json.dumps(line).encode() + b"\n"
            size += len(data)
            out.write(data)
        out.write(f"\r\n--{BOUNDARY}--\r\n".encode())
    return size


def request(port: int, method: str, path: str, token: str, body=None, headers=None, length=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    all_headers = {"Authorization": f"Bearer {token}", **(headers or {})}
    if length is not None:
        all_headers["Content-Length"] = str(length)
    conn.request(method, path, body=body, headers=all_headers)
    return conn, conn.getresponse()


def call(port: int, method: str, path: str, token: str, payload: dict | None = None) -> dict:
    body = json.dumps(payload) if payload is not None else None
    conn, response = request(port, method, path, token, body, {"Content-Type": "application/json"})
    data = json.loads(response.read())
    conn.close()
    if response.status >= 300:
        raise RuntimeError(f"{method} {path}: {response.status} {data}")
    return data


class Sampler(threading.Thread):
    def __init__(self, memory: Memory):
        super().__init__(daemon=True)
        self.memory, self.stop = memory, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.memory.sample()
            self.stop.wait(0.05)


def gunicorn_pid(port: int) -> int:
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
    return int(out.split("pid=")[1].split(",")[0])


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker(queues: list[str], extra: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "wsgi", "worker", *queues],
        cwd=ROOT,
        env=env(LOG_LEVEL="WARNING", **extra),
        start_new_session=True,
    )


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        found = predicate()
        if found:
            return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def batch_status(port: int, token: str, batch_id: str, statuses: set[str]):
    def check():
        batch = call(port, "GET", f"/api/v1/batches/{batch_id}", token)
        if batch["status"] == "failed":
            raise RuntimeError(f"the batch failed: {batch['errors']}")
        return batch if batch["status"] in statuses else None

    return check


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=50_000)
    args = parser.parse_args()
    reset_database()
    token = user_token()
    db = psycopg2.connect(DATABASE_URL)
    db.autocommit = True
    redis = Redis.from_url(REDIS_URL)
    folder = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    with fake_provider() as provider_url:
        extra = {"MODELS_FILE": str(models_file(folder, provider_url, 16)), "DEFAULT_MODEL": "fake"}
        body = folder / "upload.body"
        jsonl_bytes = write_file(body, args.lines)
        with gunicorn("wsgi:app", project_config=True, WEB_CONCURRENCY="1", **extra) as port:
            call(port, "GET", "/api/v1/models", token)  # the app is loaded and a thread has served
            master = parent_of(gunicorn_pid(port))
            memory = Memory([master])
            sampler = Sampler(memory)
            idle = memory.sample()
            sampler.start()
            intake_worker = worker(["high"], extra)
            wait(lambda: redis.keys("rq:worker:*"), 120, "the intake worker")
            try:
                start = time.perf_counter()
                with body.open("rb") as stream:
                    conn, response = request(
                        port,
                        "POST",
                        "/api/v1/files",
                        token,
                        stream,
                        {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
                        body.stat().st_size,
                    )
                    uploaded = json.loads(response.read())
                    conn.close()
                upload_s = time.perf_counter() - start
                if response.status != 200:
                    raise RuntimeError(f"upload: {response.status} {uploaded}")
                upload_peak = memory.peak
                start = time.perf_counter()
                batch = call(
                    port,
                    "POST",
                    "/api/v1/batches",
                    token,
                    {"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
                )
                wait(batch_status(port, token, batch["id"], {"in_progress"}), 600, "the intake")
                with db.cursor() as cur:
                    cur.execute("SELECT count(*) FROM tasks WHERE batch_id = %s AND status = 'PENDING'", (batch["id"],))
                    pending = cur.fetchone()[0]
                # The jobs are enqueued after the commit that made the batch in_progress.
                wait(lambda: redis.llen("rq:queue:low") >= pending, 600, "the enqueues")
                intake_s = time.perf_counter() - start
                queued = redis.llen("rq:queue:low")
                with db.cursor() as cur:
                    # 50,000 answers without running them: one statement stands in for the workers.
                    cur.execute(
                        "UPDATE tasks SET status = 'COMPLETED', progress = 100, result = repeat('answer ', 28),"
                        " prompt_tokens = 500, completion_tokens = 32, finish_reason = 'stop', finished_at = now(),"
                        " attempts = 1 WHERE batch_id = %s",
                        (batch["id"],),
                    )
                start = time.perf_counter()
                done = wait(batch_status(port, token, batch["id"], {"completed"}), 600, "the finalizing")
                finalize_s = time.perf_counter() - start
                memory.peak = memory.sample()
                start = time.perf_counter()
                conn, response = request(port, "GET", f"/api/v1/files/{done['output_file_id']}/content", token)
                streamed = lines = 0
                while chunk := response.read(1 << 16):
                    streamed += len(chunk)
                    lines += chunk.count(b"\n")
                conn.close()
                output_s = time.perf_counter() - start
                output_peak = memory.peak
            finally:
                sampler.stop.set()
                stop_workers([intake_worker])

            cost = worker_cost(port, token, redis, db, extra)

    completed = done["request_counts"]["completed"]
    report = [
        f"file: {args.lines:,} lines, {jsonl_bytes / 1e6:.1f} MB of JSONL",
        f"upload (POST /files, stored in PostgreSQL): {upload_s:.1f} s",
        f"web RSS: {idle:.0f} MiB idle, peak {upload_peak:.0f} MiB during the upload",
        f"intake (POST /batches -> in_progress): {intake_s:.1f} s for {pending:,} tasks and {queued:,} jobs",
        f"upload + intake: {upload_s + intake_s:.1f} s (target <= 60 s)",
        f"finalizing (the output file's {completed:,} lines counted): {finalize_s:.1f} s",
        f"output streamed: {lines:,} lines, {streamed / 1e6:.1f} MB in {output_s:.1f} s",
        f"web RSS peak while streaming: {output_peak:.0f} MiB",
        f"worker CPU per task ({COST_TASKS} each): batch line {cost['batch'] * 1000:.2f} ms, "
        f"API task {cost['api'] * 1000:.2f} ms",
    ]
    print("\n".join(report))


def worker_cost(port: int, token: str, redis: Redis, db, extra: dict) -> dict:
    """CPU seconds per task of one worker running COST_TASKS batch lines, then COST_TASKS API tasks."""
    prompts = [f"Cost probe {n}: what is two plus two?" for n in range(COST_TASKS)]
    lines = b"".join(
        json.dumps(
            {
                "custom_id": f"c{n}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "fake", "messages": [{"role": "user", "content": prompt}], "max_tokens": 16},
            }
        ).encode()
        + b"\n"
        for n, prompt in enumerate(prompts)
    )
    results = {}
    for kind in ("batch", "api"):
        with db.cursor() as cur:
            cur.execute("TRUNCATE tasks CASCADE")
        redis.flushdb()
        process = worker(["high", "default", "low"], extra)
        try:
            wait(lambda: redis.keys("rq:worker:*"), 60, "the worker")
            time.sleep(1)
            before = cpu_seconds(process.pid)
            if kind == "batch":
                body = (
                    (
                        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="c.jsonl"\r\n\r\n'
                    ).encode()
                    + lines
                    + f"\r\n--{BOUNDARY}--\r\n".encode()
                )
                conn, response = request(
                    port,
                    "POST",
                    "/api/v1/files",
                    token,
                    body,
                    {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
                )
                file_id = json.loads(response.read())["id"]
                conn.close()
                call(
                    port,
                    "POST",
                    "/api/v1/batches",
                    token,
                    {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
                )
            else:
                for prompt in prompts:
                    call(
                        port,
                        "POST",
                        "/api/v1/tasks",
                        token,
                        {"prompt": prompt, "model": "fake", "params": {"max_tokens": 16}},
                    )

            def finished():
                with db.cursor() as cur:
                    cur.execute("SELECT count(*) FROM tasks WHERE status = 'COMPLETED'")
                    return cur.fetchone()[0] >= COST_TASKS

            wait(finished, 600, f"the {kind} tasks")
            results[kind] = (cpu_seconds(process.pid) - before) / COST_TASKS
        finally:
            stop_workers([process])
    return results


if __name__ == "__main__":
    main()
