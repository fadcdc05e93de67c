"""`make run`'s path end to end: SQLite, embedded Valkey, the local model, web, worker, scheduler."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.helpers import EMBEDDED_UNSET, ROOT, free_port, loose_modes, wait_http


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
        assert loose_modes(tmp_path / "instance") == []  # no other local user reads any of it

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


def _serve(env: dict, log) -> subprocess.Popen:
    # A session (and process group) of its own, as a terminal gives `make run`: Ctrl+C is a
    # SIGINT to that whole group.
    return subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "wsgi", "serve"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _ctrl_c(serve: subprocess.Popen, log_path) -> str:
    """Press Ctrl+C: SIGINT to the whole process group; return the log once everything has stopped."""
    os.killpg(serve.pid, signal.SIGINT)
    try:
        code = serve.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(serve.pid, signal.SIGKILL)
        raise
    output = log_path.read_text()
    assert code == 0, output[-3000:]
    leftovers = subprocess.run(["pgrep", "-s", str(serve.pid)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], output[-3000:]
    return output


def _row(instance, task_id: int) -> tuple:
    with sqlite3.connect(instance / "app.db") as connection:
        return connection.execute(
            "SELECT status, attempts, max_attempts, error_kind FROM tasks WHERE id = ?", (task_id,)
        ).fetchone()


@pytest.mark.timeout(300)
def test_ctrl_c_hands_running_tasks_back_and_restarts_count_only_live_workers(tmp_path, fake_provider):
    instance = tmp_path / "instance"
    models = tmp_path / "models.toml"
    models.write_text(f'[models.slow]\nbase_url = "{fake_provider.url}"\nupstream = "slow"\ndefault_max_tokens = 400\n')
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in EMBEDDED_UNSET}
    env.update(
        INSTANCE_PATH=str(instance),
        PORT=str(port),
        LOCAL_MODEL_URL=f"http://127.0.0.1:{free_port()}/v1",  # the model starts too, and must stop after the worker
        MODELS_FILE=str(models),
        DEFAULT_MODEL="slow",
        SHUTDOWN_GRACE_SECONDS="1",
        PYTHONPATH=str(ROOT),
    )
    base = f"http://127.0.0.1:{port}"
    prompt = "Tell me a long story."
    fake_provider.script(prompt, {"chunks": 300, "delay": 0.1})  # 30 s: still running at Ctrl+C
    first_log = tmp_path / "first.log"
    with first_log.open("w") as out:
        serve = _serve(env, out)
    try:
        wait_http(f"{base}/api/v1/health", timeout=90, process=serve)
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
        task = request("POST", f"{base}/api/v1/tasks", token, {"prompt": prompt})
        deadline = time.monotonic() + 30
        while not request("GET", f"{base}/api/v1/tasks/{task['id']}", token)["result"]:
            assert time.monotonic() < deadline, "the task did not start streaming"
            time.sleep(0.1)
    except BaseException:
        os.killpg(serve.pid, signal.SIGKILL)
        raise
    output = _ctrl_c(serve, first_log)
    assert "Traceback" not in output, output[-5000:]
    assert " as None" not in output, output[-5000:]
    # Handed back: PENDING again, its attempt refunded (as many left as a fresh task has).
    status, attempts, max_attempts, kind = _row(instance, task["id"])
    assert (status, kind) == ("PENDING", "shutdown"), output[-3000:]
    assert max_attempts - attempts == 3, (attempts, max_attempts)

    second_log = tmp_path / "second.log"
    with second_log.open("w") as out:
        serve = _serve(env, out)
    try:
        wait_http(f"{base}/api/v1/health", timeout=90, process=serve)
        # The workers of the first run unregistered: only the two live ones (tasks, webhooks) count.
        deadline = time.monotonic() + 30
        while (health := request("GET", f"{base}/api/v1/health", token))["checks"]["workers"].get("count", 0) < 2:
            assert time.monotonic() < deadline, health
            time.sleep(0.2)
        assert health["checks"]["workers"]["count"] == 2, health
        deadline = time.monotonic() + 30
        while (done := request("GET", f"{base}/api/v1/tasks/{task['id']}", token))["status"] != "COMPLETED":
            assert time.monotonic() < deadline, done
            time.sleep(0.2)
        assert done["result"].startswith("Echo: ")  # the second call, after the restart
    except BaseException:
        os.killpg(serve.pid, signal.SIGKILL)
        raise
    assert "Traceback" not in _ctrl_c(serve, second_log)
