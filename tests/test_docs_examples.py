"""The examples in docs/webhooks.md, docs/streams.md and docs/batches.md run as written, against the real app."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest
from sqlalchemy import update
from werkzeug.serving import make_server

from tests import servers
from tests.helpers import ROOT, free_port, wait_for
from tests.receiver import deliver_all
from webapp.extensions import db
from webapp.models import Task, utcnow
from webapp.services import outbox

_tasks = Task.__table__
worker = servers.worker  # a real `flask worker` process (module-scoped)


def example(doc: str, name: str) -> str:
    """Return the code block that follows `<!-- docs-example: name -->` in a doc."""
    text = (ROOT / "docs" / doc).read_text()
    match = re.search(rf"<!-- docs-example: {name} -->\n```\w+\n(.*?)```", text, re.S)
    assert match, f"no example {name!r} in docs/{doc}"
    return match.group(1)


@pytest.fixture
def server(app):
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def finished_task(app, api, text: str = "The capital of France is Paris.") -> int:
    """A task finished the lifecycle's way: the change and its outbox rows in one transaction."""
    task = api.submit("What is the capital of France?")
    with app.app_context(), db.engine.begin() as connection:
        rows = connection.execute(
            update(_tasks)
            .where(_tasks.c.id == task["id"])
            .values(status="COMPLETED", result=text, progress=100, finished_at=utcnow())
            .returning(*_tasks.c)
        ).mappings()
        outbox.record_task_events(connection, [dict(r) for r in rows])
    return task["id"]


def test_the_receiver_example_verifies_a_real_delivery(app, api, tmp_path):
    (tmp_path / "receiver.py").write_text(example("webhooks.md", "receiver"))
    port = free_port()
    app.config["WEBHOOK_ALLOW_LOOPBACK"] = True
    try:
        created = api.post("/webhooks", json={"url": f"http://127.0.0.1:{port}/hooks", "events": ["task.completed"]})
        env = {**os.environ, "WEBHOOK_SECRET": created.get_json()["secret"]}
        log = tmp_path / "receiver.log"
        with log.open("w") as out:
            receiver = subprocess.Popen(
                [sys.executable, "-m", "flask", "--app", "receiver", "run", "--port", str(port)],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(lambda: "Running on" in log.read_text(), timeout=20)
            task_id = finished_task(app, api)
            deliver_all(app)
            wait_for(lambda: f"task.completed {task_id}" in log.read_text(), timeout=10)
        finally:
            receiver.terminate()
            receiver.wait(10)
    finally:
        app.config["WEBHOOK_ALLOW_LOOPBACK"] = False
    assert "204" in log.read_text()


def test_the_stream_examples_run_as_written(app, api, server, tmp_path):
    task_id = finished_task(app, api)
    env = {**os.environ, "BASE": server, "TOKEN": api.token, "TASK": str(task_id)}
    if shutil.which("curl"):
        curl = subprocess.run(
            ["bash", "-c", example("streams.md", "curl")], env=env, capture_output=True, text=True, timeout=30
        )
        assert curl.returncode == 0, curl.stderr
        assert "event: text\nid: 31\n" in curl.stdout and "event: status" in curl.stdout
    (tmp_path / "follow.py").write_text(example("streams.md", "python"))
    python = subprocess.run(
        [sys.executable, "follow.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    assert python.returncode == 0, python.stderr
    assert python.stdout == "The capital of France is Paris.\n"


def test_the_batch_example_runs_as_written(app, api, server, worker, tmp_path):
    """docs/batches.md's ten lines of the `openai` SDK, against the app and a real worker."""
    line = {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions"}
    body = {"model": "fake", "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    (tmp_path / "requests.jsonl").write_text(json.dumps({**line, "body": body}) + "\n")
    (tmp_path / "batch.py").write_text(example("batches.md", "sdk"))
    env = {**os.environ, "BASE": server, "TOKEN": api.token}
    run = subprocess.run(
        [sys.executable, "batch.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("completed 1 answers: ")
    answer = json.loads(run.stdout.split("answers: ", 1)[1])
    assert answer["custom_id"] == "q1"
    assert answer["response"]["body"]["choices"][0]["message"]["content"] == "Echo: What is the capital of France?"
