"""Fixtures: the app on real PostgreSQL and Redis, a real fake provider, clients and a CLI runner.

The helpers tests call (users, API clients, running jobs, waiting) are in tests/helpers.py.
Tables are truncated and the Redis db flushed after every test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from redis import Redis
from sqlalchemy import text

from tests.fake_provider import FakeProvider
from tests.helpers import ROOT, TEST_DATABASE_URL, TEST_REDIS_URL, ApiClient, api_client, app_overrides
from webapp import create_app
from webapp.extensions import db

TABLES = "idempotency_keys, tasks, user_sessions, api_tokens, users"


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

[models.fake-one]
base_url = "{fake_provider.url}"
upstream = "fake-one"
default_max_tokens = 64
concurrency = 1

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
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


@pytest.fixture(scope="session")
def app(test_env):
    app = create_app(app_overrides(test_env, DATABASE_URL=TEST_DATABASE_URL, REDIS_URL=TEST_REDIS_URL))
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
    redis = Redis.from_url(app.config["REDIS_URL"])  # TEST_REDIS_URL, or the embedded Valkey (test_embedded_input)
    redis.flushdb()
    yield
    with app.app_context():
        db.session.remove()
        with db.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
            else:  # SQLite has no TRUNCATE; an emptied table numbers its rows from 1 again
                for table in reversed(db.metadata.sorted_tables):
                    conn.execute(table.delete())
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


@pytest.fixture
def api(app) -> ApiClient:
    return api_client(app)


@pytest.fixture
def other_api(app) -> ApiClient:
    return api_client(app, "bob")


@pytest.fixture
def priced_app(app, fake_provider):
    """An app beside `app` whose catalog has prices and fallbacks (tests/priced.py)."""
    from tests.priced import make_priced_app

    priced = make_priced_app(app, fake_provider.url)
    yield priced
    with priced.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def receiver():
    """A real webhook receiver on loopback (tests/receiver.py)."""
    from tests.receiver import Receiver

    server = Receiver().start()
    yield server
    server.stop()


@pytest.fixture
def hooks(app):
    """Loopback allowed, quick retries, a short timeout; restored afterwards."""
    saved = {k: app.config[k] for k in ("WEBHOOK_ALLOW_LOOPBACK", "WEBHOOK_RETRY_DELAYS", "WEBHOOK_TIMEOUT")}
    app.config.update(WEBHOOK_ALLOW_LOOPBACK=True, WEBHOOK_RETRY_DELAYS="5,300", WEBHOOK_TIMEOUT=1.0)
    yield app.config
    app.config.update(saved)


def pytest_terminal_summary(terminalreporter):
    """Print what the security tests tried (tests/tally.py), when they ran."""
    from tests.tally import counts

    if counts:
        terminalreporter.write_sep("-", "security checks")
        for name, count in sorted(counts.items()):
            terminalreporter.write_line(f"{count:>9,}  {name}")
