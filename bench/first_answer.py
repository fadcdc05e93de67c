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
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, free_port
from tests.helpers import EMBEDDED_UNSET
from tests.servers import Stack, embedded_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the clone afterwards")
    parser.add_argument("--database-url", help="run on this database instead of the embedded SQLite")
    parser.add_argument("--redis-url", help="run on this Redis instead of the embedded Valkey")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="first-answer-"))
    clone = workdir / "app"
    # The clone's `make run` makes its own .venv: nothing of this one may leak into it.
    env = embedded_env(
        (*EMBEDDED_UNSET, "VIRTUAL_ENV"), PORT=str(free_port()), LOCAL_MODEL_URL=f"http://127.0.0.1:{free_port()}/v1"
    )
    if args.database_url:
        env["DATABASE_URL"] = args.database_url
    if args.redis_url:
        env["REDIS_URL"] = args.redis_url
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    t0 = time.monotonic()
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    t_clone = time.monotonic() - t0
    flask = (str(clone / ".venv/bin/flask"),)
    run = Stack(env, workdir / "make-run.log", command=("make", "run"), cwd=clone, flask=flask).start()
    try:
        try:
            run.wait_healthy(timeout=3600)  # a fresh install: no time limit worth the name
        except AssertionError as exc:
            sys.exit(f"{exc}; see {run.log_path}")
        t_up = time.monotonic() - t0
        token = run.create_token()
        task, seen = run.follow(token, {"prompt": "What is the capital of France?"}, t0=t0)
        t_answer = time.monotonic() - t0
        # A longer answer, to watch the progress and the text grow.
        story, story_seen = run.follow(token, {"prompt": "Write a short story about a lighthouse keeper."}, t0=t0)
    finally:
        run.ctrl_c()
        run.wait(60)
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
