"""Memory at rest: a `flask worker` and the local model server, vs a bare Python and a bare RQ worker.

    .venv/bin/python -m bench.memory [--tasks 5]

Reads RSS and PSS (kB, /proc/<pid>/smaps_rollup) of each process and its children:

- baseline: `python -c "import rq"` left sleeping, and a bare `rq worker --with-scheduler` (RQ forks
  its scheduler into a second process, as our worker does) on its own queue, at
  rest and after it ran --tasks trivial jobs (RQ's default fork-per-job, like ours);
- `flask --app wsgi worker` after start-up (registered with RQ, idle), and after it ran
  --tasks tasks end to end (submitted through the API, answered by the fake provider
  tests/fake_provider.py in its own process); with `--concurrency 4` too when
  `flask worker --help` offers that option;
- `flask --app wsgi local-model` (SmolLM2-135M served by xllamacpp) once it answers /health,
  and after it answered one chat completion; its weights file's size is printed beside it.

PSS shares pages among the processes that map them (a forked work-horse shares its parent's
pages), so it is the fair "what this costs the machine" figure; RSS counts shared pages fully.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psycopg2
from redis import Redis
from rq import Queue, Worker

from bench.common import DATABASE_URL, REDIS_URL, ROOT, env, free_port, gunicorn, reset_database, user_token


def smaps(pid: int) -> tuple[int, int]:
    """Return (RSS, PSS) in kB of a process, or (0, 0) if it is gone."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("Rss", "Pss"):
                values[name] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return 0, 0
    return values.get("Rss", 0), values.get("Pss", 0)


def tree(pid: int) -> list[int]:
    """Return `pid` and all its descendants."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def measure(pid: int) -> dict:
    pids = tree(pid)
    sizes = [smaps(p) for p in pids]
    return {"processes": len(pids), "rss": sum(s[0] for s in sizes), "pss": sum(s[1] for s in sizes)}


def start(args: list[str], **extra: str) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, env=env(**extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def settle() -> None:
    time.sleep(2.0)  # let start-up allocations and a finished work-horse go


def registered(redis: Redis, count: int) -> bool:
    return len(Worker.all(connection=redis)) >= count


def bare_worker(redis: Redis, tasks: int) -> tuple[dict, dict]:
    rq = str(Path(sys.executable).parent / "rq")
    worker = start([rq, "worker", "--with-scheduler", "--url", REDIS_URL, "bare"])
    try:
        wait_for(lambda: registered(redis, 1), "the bare RQ worker")
        settle()
        at_rest = measure(worker.pid)
        queue = Queue("bare", connection=redis)
        jobs = [queue.enqueue("bench.noop", n) for n in range(tasks)]
        wait_for(lambda: all(job.get_status(refresh=True) == "finished" for job in jobs), "the bare jobs")
        settle()
        return at_rest, measure(worker.pid)
    finally:
        stop(worker)


def product_worker(redis: Redis, port: int, token: str, tasks: int, extra: list[str], env_: dict) -> tuple[dict, dict]:
    worker = start([sys.executable, "-m", "flask", "--app", "wsgi", "worker", *extra], **env_)
    try:
        wait_for(lambda: registered(redis, 1), "flask worker")
        settle()
        at_rest = measure(worker.pid)
        ids = []
        for n in range(tasks):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/v1/tasks",
                json.dumps({"prompt": f"Count to {n}."}).encode(),
                {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=10) as answer:
                ids.append(json.loads(answer.read())["id"])

        def finished() -> bool:
            with psycopg2.connect(DATABASE_URL) as conn, conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM tasks WHERE id = ANY(%s) AND status = 'COMPLETED'", (ids,))
                return cur.fetchone()[0] == len(ids)

        wait_for(finished, "the tasks to complete")
        settle()
        return at_rest, measure(worker.pid)
    finally:
        stop(worker)
        wait_for(lambda: not registered(redis, 1), "the worker to leave", 30)


def local_model() -> tuple[dict, dict, int]:
    from jobs.local_model import model_path

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start([sys.executable, "-m", "flask", "--app", "wsgi", "local-model"], LOCAL_MODEL_URL=f"{base}/v1")

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, "the local model", 120)
        settle()
        loaded = measure(server.pid)
        body = {
            "model": "local",
            "max_tokens": 32,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        }
        request = urllib.request.Request(
            f"{base}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as answer:
            answer.read()
        settle()
        return loaded, measure(server.pid), model_path().stat().st_size
    finally:
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=5)
    args = parser.parse_args()

    reset_database()
    redis = Redis.from_url(REDIS_URL)
    token = user_token("memory")
    rows: dict[str, dict] = {}

    bare = start([sys.executable, "-c", "import rq, time; time.sleep(600)"])
    try:
        time.sleep(1.0)
        wait_for(lambda: smaps(bare.pid)[0] > 0, "python -c 'import rq'")
        settle()
        rows['baseline: python -c "import rq"'] = measure(bare.pid)
    finally:
        stop(bare)
    rest, worked = bare_worker(redis, args.tasks)
    rows["baseline: rq worker, at rest"] = rest
    rows[f"baseline: rq worker, after {args.tasks} jobs"] = worked

    help_text = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "worker", "--help"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    variants = [[]] + ([["--concurrency", "4"]] if "--concurrency" in help_text else [])
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        provider = subprocess.Popen(
            [sys.executable, "-m", "tests.fake_provider", "0"], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        try:
            url = provider.stdout.readline().split()[-1]  # "fake provider at http://..."
            models = Path(tmp, "models.toml")
            models.write_text(f'[models.fake]\nbase_url = "{url}"\nupstream = "fake-1"\nmax_tokens = 1024\n')
            worker_env = {"MODELS_FILE": str(models), "DEFAULT_MODEL": "fake"}
            with gunicorn("wsgi:app", **worker_env) as port:
                for extra in variants:
                    label = " ".join(["flask worker", *extra])
                    rest, worked = product_worker(redis, port, token, args.tasks, extra, worker_env)
                    rows[f"{label}, at rest"] = rest
                    rows[f"{label}, after {args.tasks} tasks"] = worked
        finally:
            provider.terminate()
            provider.wait(10)

    loaded, answered, weights = local_model()
    rows["flask local-model, loaded"] = loaded
    rows["flask local-model, after one answer"] = answered

    print("memory at rest: RSS and PSS of each process with its children, from /proc/<pid>/smaps_rollup")
    print(f"{'':46} {'processes':>9} {'RSS MB':>8} {'PSS MB':>8}")
    for name, m in rows.items():
        print(f"{name:46} {m['processes']:9d} {m['rss'] / 1024:8.1f} {m['pss'] / 1024:8.1f}")
    base = rows["baseline: rq worker, at rest"]["pss"]
    for name, m in rows.items():
        if name.startswith("flask worker"):
            print(f"{name:46} {m['pss'] / base:5.2f} x the bare rq worker's PSS")
    print(f"local model weights file: {weights / 2**20:.1f} MB (SmolLM2-135M-Instruct, Q4_1 GGUF)")


if __name__ == "__main__":
    main()
