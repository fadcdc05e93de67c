"""Time from a fresh clone to the first real answer: clone, `make run`, token, submit, poll.

    .venv/bin/python -m bench.first_answer [--keep]

It clones this repository's HEAD into a temporary folder, runs `make run` there on the embedded
defaults (a new .venv, SQLite, embedded Valkey, the local model), creates a token with the CLI,
submits "What is the capital of France?" and polls until the task finishes, printing what it
saw on the way; then a longer answer, to show progress and text growing. pip's download cache,
if warm, shortens the install; a machine without one downloads ~250 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from bench.common import ROOT, free_port

EMBEDDED_UNSET = ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "MODELS_FILE", "DEFAULT_MODEL", "VIRTUAL_ENV")


def call(method: str, url: str, token: str | None = None, body: dict | None = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=10) as r:
        return json.loads(r.read())


def follow(base: str, token: str, body: dict, t0: float) -> tuple[dict, list]:
    """Submit a task and poll it every 0.1 s until it finishes; return it and each change seen."""
    task = call("POST", f"{base}/api/v1/tasks", token, body)
    seen: list[tuple[str, int, int, float]] = []
    while task["status"] not in ("COMPLETED", "FAILED", "CANCELLED"):
        time.sleep(0.1)
        task = call("GET", f"{base}/api/v1/tasks/{task['id']}", token)
        state = (task["status"], task["progress"], len(task["result"] or ""))
        if not seen or seen[-1][:3] != state:
            seen.append((*state, time.monotonic() - t0))
    return task, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the clone afterwards")
    parser.add_argument("--database-url", help="run on this database instead of the embedded SQLite")
    parser.add_argument("--redis-url", help="run on this Redis instead of the embedded Valkey")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="first-answer-")
    clone = os.path.join(workdir, "app")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in EMBEDDED_UNSET}
    env.update(PORT=str(port), LOCAL_MODEL_URL=f"http://127.0.0.1:{free_port()}/v1")
    if args.database_url:
        env["DATABASE_URL"] = args.database_url
    if args.redis_url:
        env["REDIS_URL"] = args.redis_url
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    subprocess.run(["git", "clone", "-q", str(ROOT), clone], check=True)
    t_clone = time.monotonic() - t0
    log = open(os.path.join(workdir, "make-run.log"), "w")  # noqa: SIM115 (the child writes to it)
    run = subprocess.Popen(
        ["make", "run"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        while True:
            if run.poll() is not None:
                sys.exit(f"make run exited with {run.returncode}; see {log.name}")
            try:
                if call("GET", f"{base}/api/v1/health")["status"] == "healthy":
                    break
            except OSError:
                time.sleep(0.25)
        t_up = time.monotonic() - t0
        token = (
            subprocess.run(
                [os.path.join(clone, ".venv/bin/flask"), "--app", "wsgi", "tokens", "create", "admin"],
                cwd=clone,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        task, seen = follow(base, token, {"prompt": "What is the capital of France?"}, t0)
        t_answer = time.monotonic() - t0
        # A longer answer, to watch the progress and the text grow.
        story, story_seen = follow(base, token, {"prompt": "Write a short story about a lighthouse keeper."}, t0)
    finally:
        os.killpg(run.pid, signal.SIGINT)
        run.wait(60)
        log.close()
    where = f"{args.database_url or 'SQLite'} + {args.redis_url or 'embedded Valkey'}"
    print(f"fresh clone to first answer (make run on {where}, local model)")
    print(f"  git clone                     {t_clone:7.1f} s")
    print(f"  healthy (install + migrate)   {t_up:7.1f} s")
    print(f"  first answer                  {t_answer:7.1f} s")
    for name, result, polls in (("first task", task, seen), ("second task", story, story_seen)):
        print(f"  {name}, what polling saw:")
        for status, progress, chars, at in polls:
            print(f"    {at:7.2f} s  {status:10} progress {progress:3}  text so far {chars:4} chars")
        print(f"    answer: {result['result'][:200]!r}  usage: {result['usage']}")
    if args.keep:
        print(f"  clone kept at {clone}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
