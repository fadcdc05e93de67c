"""Fixtures: the app on real PostgreSQL and Redis, a real fake provider, and helpers to run jobs.

TEST_DATABASE_URL and TEST_REDIS_URL choose the services (defaults: the `test` database and
Redis db 15 on 127.0.0.1). Tables are truncated and the Redis db flushed after every test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue, SimpleWorker
from rq.registry import ScheduledJobRegistry
from rq.serializers import JSONSerializer
from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fake_provider import FakeProvider  # noqa: E402
from webapp import create_app  # noqa: E402
from webapp.extensions import db  # noqa: E402
from webapp.models import Task  # noqa: E402
from webapp.queues import QUEUE_NAMES  # noqa: E402
from webapp.services import accounts  # noqa: E402

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test")
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
TABLES = "idempotency_keys, tasks, api_tokens, users"
PASSWORD = "correct horse battery"


@pytest.fixture(scope="session")
def fake_provider():
    provider = FakeProvider().start()
    yield provider
    provider.stop()


@pytest.fixture(scope="session")
def models_file(tmp_path_factory, fake_provider) -> Path:
    """A catalog with the fake provider, usable by in-process apps and worker subprocesses."""
    path = tmp_path_factory.mktemp("config") / "models.toml"
    path.write_text(
        f"""
[models.fake]
base_url = "{fake_provider.url}"
upstream = "fake-1"
description = "The test provider"
max_tokens = 1024
default_max_tokens = 64
timeout = 10
read_timeout = 2

[models.fake-wide]
base_url = "{fake_provider.url}"
upstream = "fake-wide"
default_max_tokens = 64
concurrency = 100

[models.fake-narrow]
base_url = "{fake_provider.url}"
upstream = "fake-narrow"
default_max_tokens = 64
concurrency = 3

[models.fake-rpm]
base_url = "{fake_provider.url}"
upstream = "fake-rpm"
default_max_tokens = 64
rpm = 2

[models.fake-small]
base_url = "{fake_provider.url}"
upstream = "fake-2"
max_tokens = 16
default_max_tokens = 8
"""
    )
    return path


@pytest.fixture(scope="session")
def test_env(models_file) -> dict[str, str]:
    """Environment for `flask` subprocesses that share the tests' database, Redis and catalog."""
    return {
        **os.environ,
        "SECRET_KEY": "test-secret",
        "DATABASE_URL": TEST_DATABASE_URL,
        "REDIS_URL": TEST_REDIS_URL,
        "MODELS_FILE": str(models_file),
        "DEFAULT_MODEL": "fake",
        "PROGRESS_INTERVAL": "0.05",
        "RETRY_BASE_SECONDS": "0.01",
        "RETRY_MAX_SECONDS": "0.05",
        "RATELIMIT_ENABLED": "false",
        "PYTHONPATH": str(ROOT),
    }


@pytest.fixture(scope="session")
def app(test_env):
    overrides = {
        "TESTING": True,
        "SECRET_KEY": test_env["SECRET_KEY"],
        "DATABASE_URL": TEST_DATABASE_URL,
        "REDIS_URL": TEST_REDIS_URL,
        "MODELS_FILE": test_env["MODELS_FILE"],
        "DEFAULT_MODEL": "fake",
        "PROGRESS_INTERVAL": 0.05,
        "RETRY_BASE_SECONDS": 0.01,
        "RETRY_MAX_SECONDS": 0.05,
        "RATELIMIT_ENABLED": False,
    }
    app = create_app(overrides)
    with app.app_context():
        # Start from an empty schema and build it with the migrations, which tests them too.
        with db.engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        from flask_migrate import upgrade

        upgrade()
    yield app
    with app.app_context():
        db.engine.dispose()


@pytest.fixture(autouse=True)
def _clean(request, fake_provider):
    """Leave nothing behind: jobs commit, so rolling back would not clean up."""
    if "app" not in request.fixturenames:
        yield
        return
    app = request.getfixturevalue("app")
    redis = Redis.from_url(TEST_REDIS_URL)
    redis.flushdb()
    yield
    with app.app_context():
        db.session.remove()
        with db.engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
    redis.flushdb()
    fake_provider.reset()


@pytest.fixture
def ctx(app):
    with app.app_context():
        yield
        db.session.remove()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


def make_user(app, username: str = "alice", admin: bool = False):
    with app.app_context():
        user = accounts.create_user(username, PASSWORD, is_admin=admin)
        db.session.expunge(user)
        return user


class ApiClient:
    """The test client with a bearer token, for /api/v1 paths."""

    def __init__(self, client, token: str, user):
        self.client = client
        self.token = token
        self.user = user
        self.headers = {"Authorization": f"Bearer {token}"}

    def _call(self, method: str, path: str, **kwargs):
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return getattr(self.client, method)(f"/api/v1{path}", headers=headers, **kwargs)

    def get(self, path, **kw):
        return self._call("get", path, **kw)

    def post(self, path, **kw):
        return self._call("post", path, **kw)

    def delete(self, path, **kw):
        return self._call("delete", path, **kw)

    def submit(self, prompt: str = "What is the capital of France?", **fields) -> dict:
        response = self.post("/tasks", json={"prompt": prompt, **fields})
        assert response.status_code == 202, response.get_json()
        return response.get_json()

    def task(self, task_id: int) -> dict:
        response = self.get(f"/tasks/{task_id}")
        assert response.status_code == 200, response.get_json()
        return response.get_json()


def api_client(app, username: str = "alice", admin: bool = False) -> ApiClient:
    user = make_user(app, username, admin)
    with app.app_context():
        owner = accounts.find_user(username)
        _, token = accounts.create_token(owner, "tests")
    return ApiClient(app.test_client(), token, user)


@pytest.fixture
def api(app) -> ApiClient:
    return api_client(app)


@pytest.fixture
def other_api(app) -> ApiClient:
    return api_client(app, "bob")


def redis_conn() -> Redis:
    return Redis.from_url(TEST_REDIS_URL)


def enqueue_scheduled_now(connection: Redis) -> int:
    """Move every delayed job (a retry's backoff) onto its queue now; return how many."""
    moved = 0
    for name in QUEUE_NAMES:
        queue = Queue(name, connection=connection, serializer=JSONSerializer)
        registry = ScheduledJobRegistry(queue=queue)
        for job_id in registry.get_job_ids():
            registry.remove(job_id)
            job = queue.fetch_job(job_id)
            if job is not None:
                queue.enqueue_job(job)
                moved += 1
    return moved


def work(app, scheduled: bool = True, rounds: int = 20) -> None:
    """Run every queued job in this process (RQ's SimpleWorker), including retries when `scheduled`."""
    connection = redis_conn()
    with app.app_context():
        for _ in range(rounds):
            SimpleWorker(list(QUEUE_NAMES), connection=connection, serializer=JSONSerializer).work(
                burst=True, logging_level="WARNING"
            )
            if not scheduled or not enqueue_scheduled_now(connection):
                break
        db.session.remove()


def task_row(app, task_id: int) -> Task:
    with app.app_context():
        task = db.session.get(Task, task_id)
        db.session.expunge(task)
        return task


@pytest.fixture
def priced_app(app, fake_provider):
    """An app beside `app` whose catalog has prices and fallbacks (tests/priced.py)."""
    from tests.priced import make_priced_app

    priced = make_priced_app(app, fake_provider.url)
    yield priced
    with priced.app_context():
        db.session.remove()
        db.engine.dispose()


def pytest_terminal_summary(terminalreporter):
    """Print what the security tests tried (tests/tally.py), when they ran."""
    from tests.tally import counts

    if counts:
        terminalreporter.write_sep("-", "security checks")
        for name, count in sorted(counts.items()):
            terminalreporter.write_line(f"{count:>9,}  {name}")
