"""The command line contract: users, tokens, and a real `flask worker` process."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT, api_client


def test_users_create_with_password_on_stdin(runner, app):
    result = runner.invoke(args=["users", "create", "dora", "--admin", "--password-stdin"], input="s3cret-pass\n")
    assert result.exit_code == 0, result.output
    assert "Created admin dora" in result.output
    from webapp.services.accounts import authenticate

    with app.app_context():
        user = authenticate("dora", "s3cret-pass")
        assert user is not None and user.is_admin


def test_users_create_refuses_duplicates_and_short_passwords(runner):
    assert runner.invoke(args=["users", "create", "erin", "--password-stdin"], input="long-enough\n").exit_code == 0
    taken = runner.invoke(args=["users", "create", "ERIN", "--password-stdin"], input="long-enough\n")
    assert taken.exit_code != 0 and "taken" in taken.output
    short = runner.invoke(args=["users", "create", "frank", "--password-stdin"], input="short\n")
    assert short.exit_code != 0 and "at least 8" in short.output
    bad = runner.invoke(args=["users", "create", "no spaces", "--password-stdin"], input="long-enough\n")
    assert bad.exit_code != 0


def test_tokens_create_prints_the_token_alone_on_the_last_line(runner, client):
    runner.invoke(args=["users", "create", "gus", "--password-stdin"], input="long-enough\n")
    result = runner.invoke(args=["tokens", "create", "gus"])
    assert result.exit_code == 0
    token = result.stdout.strip().splitlines()[-1]
    assert token.startswith("atr_") and " " not in token and len(token) > 40
    assert client.get("/api/v1/tasks", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_tokens_create_for_an_unknown_user(runner):
    result = runner.invoke(args=["tokens", "create", "nobody"])
    assert result.exit_code != 0 and "No user named" in result.output


def test_a_real_worker_process_runs_tasks(app, test_env, fake_provider):
    api = api_client(app)
    tasks = [api.submit(f"through a forked work-horse {i}") for i in range(3)]
    done = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "worker", "--burst"],
        cwd=ROOT,
        env=test_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for task in tasks:
        result = api.task(task["id"])
        assert result["status"] == "COMPLETED", result
        assert result["result"] == f"Echo: {task['prompt']}"
    # Every log line about a task names the task and its job.
    lines = [line for line in done.stderr.splitlines() if "jobs.events" in line]
    assert lines and all(" task " in line and " job task-" in line for line in lines)


def test_worker_rejects_unknown_queues(test_env):
    done = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "worker", "--burst", "urgent"],
        cwd=ROOT,
        env=test_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "unknown queue" in done.stderr
