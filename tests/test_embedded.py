"""`make run`'s path end to end: SQLite, embedded Valkey, the local model, web, worker, scheduler."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.helpers import ROOT, free_port, wait_http

EMBEDDED_UNSET = ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "MODELS_FILE", "DEFAULT_MODEL")


def request(method: str, url: str, token: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.timeout(180)
def test_make_run_serves_a_real_answer_on_the_embedded_defaults(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in EMBEDDED_UNSET}
    env.update(
        INSTANCE_PATH=str(tmp_path / "instance"),
        PORT=str(port),
        LOCAL_MODEL_URL=f"http://127.0.0.1:{free_port()}/v1",
        PYTHONPATH=str(ROOT),
    )
    log = tmp_path / "serve.log"
    with log.open("w") as out:  # the child keeps its own descriptor
        serve = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "wsgi", "serve"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/api/v1/health", timeout=90, process=serve)
        output = log.read_text()
        assert "Created the first user: admin" in output and "Password (shown once):" in output
        assert (tmp_path / "instance" / "app.db").exists()  # SQLite, not PostgreSQL
        assert (tmp_path / "instance" / "valkey.sock").exists()  # the embedded Valkey

        token = (
            subprocess.run(
                [sys.executable, "-m", "flask", "--app", "wsgi", "tokens", "create", "admin"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        task = request(
            "POST",
            f"{base}/api/v1/tasks",
            token,
            {"prompt": "What is the capital of France?", "params": {"max_tokens": 32}},
        )
        assert task["model"] == "local"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            task = request("GET", f"{base}/api/v1/tasks/{task['id']}", token)
            if task["status"] in ("COMPLETED", "FAILED"):
                break
            time.sleep(0.25)
        assert task["status"] == "COMPLETED", task
        assert task["result"].strip()
        health = request("GET", f"{base}/api/v1/health", token)
        assert health["status"] == "healthy" and health["checks"]["workers"]["count"] >= 1
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            code = serve.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            raise
        tail = log.read_text()[-3000:]
    assert code == 0, tail
    # Everything it started has stopped with it.
    leftovers = subprocess.run(["pgrep", "-s", str(serve.pid)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], tail
