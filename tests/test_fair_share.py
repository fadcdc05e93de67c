"""Fair share: one user's backlog in a model's line does not hold up another user's task behind it.

User A queues 30 tasks on a model with 2 slots; user B submits one after them. B's task starts
within about one task's time (round robin across users within a priority), not after A's backlog.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from rq import Worker
from sqlalchemy import select

from tests.helpers import ROOT, api_client, app_with, redis_conn, wait_for
from webapp.extensions import db
from webapp.models import Task

SLOW = '#fake {"chunks": 5, "delay": 0.1}\n'  # about half a second per answer


@pytest.fixture
def pair(app, fake_provider, test_env, tmp_path):
    """An app whose catalog has `pair` (2 slots), and a real worker process on that catalog."""
    models = tmp_path / "models.toml"
    models.write_text(
        f'[models.pair]\nbase_url = "{fake_provider.url}"\nupstream = "pair"\n'
        "default_max_tokens = 16\nconcurrency = 2\n"
    )
    paired = app_with(app, MODELS_FILE=str(models), DEFAULT_MODEL="pair", RATELIMIT_ENABLED=False)
    log = (tmp_path / "worker.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "wsgi", "worker"],
        cwd=ROOT,
        env={**test_env, "MODELS_FILE": str(models), "DEFAULT_MODEL": "pair"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: Worker.all(connection=redis_conn()), timeout=60)
        yield paired
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def test_another_users_task_starts_within_about_one_task_of_a_backlog(app, pair):
    alice, bob = api_client(app, "alice"), api_client(app, "bob")
    alice.client = bob.client = pair.test_client()
    backlog = [alice.submit(f"{SLOW}alice {n}")["id"] for n in range(30)]
    time.sleep(1.0)  # A's backlog is in the model's line, its first tasks running
    bob_id = bob.submit(f"{SLOW}bob")["id"]
    wait_for(lambda: bob.task(bob_id)["status"] == "COMPLETED", timeout=60)

    with pair.app_context():
        rows = {row.id: row for row in db.session.scalars(select(Task))}
        db.session.remove()
    bob_task = rows[bob_id]
    started = [rows[i].started_at for i in backlog if rows[i].started_at]
    ahead = [when for when in started if bob_task.created_at < when < bob_task.started_at]
    waited = (bob_task.started_at - bob_task.created_at).total_seconds()
    # At most one of A's tasks per slot started between B's submission and B's start.
    assert len(ahead) <= 2, f"{len(ahead)} of A's tasks started first; B waited {waited:.1f} s"
    unfinished = [i for i in backlog if rows[i].status != "COMPLETED"]
    assert unfinished, "A's backlog had all run before B's task: the test proves nothing"
    print(f"B waited {waited:.2f} s behind a backlog of 30 (2 slots); {len(ahead)} of A's tasks started first")
    # What is left of A's backlog finishes, so no attempt outlives the test.
    wait_for(lambda: all(alice.task(i)["status"] == "COMPLETED" for i in backlog), timeout=60)
