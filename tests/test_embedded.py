"""`make run`'s path end to end: SQLite, embedded Valkey, the local model, web, worker, scheduler."""

from __future__ import annotations

import sqlite3
import time

import pytest

from tests.helpers import ROOT, free_port, loose_modes
from tests.servers import Stack, embedded_env


@pytest.mark.timeout(180)
def test_make_run_serves_a_real_answer_on_the_embedded_defaults(tmp_path):
    env = embedded_env(
        INSTANCE_PATH=str(tmp_path / "instance"),
        PORT=str(free_port()),
        LOCAL_MODEL_URL=f"http://127.0.0.1:{free_port()}/v1",
        PYTHONPATH=str(ROOT),
    )
    serve = Stack(env, tmp_path / "serve.log").start()
    try:
        serve.wait_healthy(timeout=90)
        output = serve.log()
        assert "Created the first user: admin" in output and "Password (shown once):" in output
        assert (tmp_path / "instance" / "app.db").exists()  # SQLite, not PostgreSQL
        assert (tmp_path / "instance" / "valkey.sock").exists()  # the embedded Valkey
        assert loose_modes(tmp_path / "instance") == []  # no other local user reads any of it

        token = serve.create_token()
        body = {"prompt": "What is the capital of France?", "params": {"max_tokens": 32}}
        task, _ = serve.follow(token, body, every=0.25, timeout=90)
        assert task["model"] == "local"
        assert task["status"] == "COMPLETED", task
        assert task["result"].strip()
        health = serve.call("GET", "/api/v1/health", token)
        assert health["status"] == "healthy" and health["checks"]["workers"]["count"] >= 1
    finally:
        serve.terminate()
        code = serve.wait(40)
        tail = serve.log()[-3000:]
    assert code == 0, tail
    # Everything it started has stopped with it.
    assert serve.leftovers() == [], tail


def _ctrl_c(serve: Stack) -> str:
    """Press Ctrl+C; return the log once everything has stopped."""
    serve.ctrl_c()
    code = serve.wait(60)
    output = serve.log()
    assert code == 0, output[-3000:]
    assert serve.leftovers() == [], output[-3000:]
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
    env = embedded_env(
        INSTANCE_PATH=str(instance),
        PORT=str(free_port()),
        LOCAL_MODEL_URL=f"http://127.0.0.1:{free_port()}/v1",  # the model starts too, and must stop after the worker
        MODELS_FILE=str(models),
        DEFAULT_MODEL="slow",
        SHUTDOWN_GRACE_SECONDS="1",
        PYTHONPATH=str(ROOT),
    )
    prompt = "Tell me a long story."
    fake_provider.script(prompt, {"chunks": 300, "delay": 0.1})  # 30 s: still running at Ctrl+C
    serve = Stack(env, tmp_path / "first.log").start()
    try:
        serve.wait_healthy(timeout=90)
        token = serve.create_token()
        task = serve.call("POST", "/api/v1/tasks", token, {"prompt": prompt})
        deadline = time.monotonic() + 30
        while not serve.call("GET", f"/api/v1/tasks/{task['id']}", token)["result"]:
            assert time.monotonic() < deadline, "the task did not start streaming"
            time.sleep(0.1)
    except BaseException:
        serve.kill()
        raise
    output = _ctrl_c(serve)
    assert "Traceback" not in output, output[-5000:]
    assert " as None" not in output, output[-5000:]
    # Handed back: PENDING again, its attempt refunded (as many left as a fresh task has).
    status, attempts, max_attempts, kind = _row(instance, task["id"])
    assert (status, kind) == ("PENDING", "shutdown"), output[-3000:]
    assert max_attempts - attempts == 3, (attempts, max_attempts)

    serve = Stack(env, tmp_path / "second.log").start()
    try:
        serve.wait_healthy(timeout=90)
        # The workers of the first run unregistered: only the two live ones (tasks, webhooks) count.
        deadline = time.monotonic() + 30
        while (health := serve.call("GET", "/api/v1/health", token))["checks"]["workers"].get("count", 0) < 2:
            assert time.monotonic() < deadline, health
            time.sleep(0.2)
        assert health["checks"]["workers"]["count"] == 2, health
        deadline = time.monotonic() + 30
        while (done := serve.call("GET", f"/api/v1/tasks/{task['id']}", token))["status"] != "COMPLETED":
            assert time.monotonic() < deadline, done
            time.sleep(0.2)
        assert done["result"].startswith("Echo: ")  # the second call, after the restart
    except BaseException:
        serve.kill()
        raise
    assert "Traceback" not in _ctrl_c(serve)
