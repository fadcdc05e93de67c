"""Helpers the tests share: users and API clients, running jobs in-process, reading rows, waiting.

TEST_DATABASE_URL and TEST_REDIS_URL choose the services (defaults: the `test` database and
Redis db 15 on 127.0.0.1). pytest's `pythonpath` (pyproject.toml) puts the repository on the
path, so tests import `tests.helpers` and the app's packages directly.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from rq import Queue, SimpleWorker
from rq.registry import ScheduledJobRegistry
from rq.serializers import JSONSerializer

from jobs.run_task import TaskAttemptError, run_task
from webapp import create_app
from webapp.extensions import db
from webapp.models import Task, User, utcnow
from webapp.queues import QUEUE_NAMES
from webapp.services import accounts

ROOT = Path(__file__).resolve().parent.parent
TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test")
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PASSWORD = "correct horse battery"


# Users and clients


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


def csrf_from(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


def login(client, username: str = "alice", password: str = PASSWORD):
    token = csrf_from(client.get("/login").get_data(as_text=True))
    return client.post("/login", data={"username": username, "password": password, "csrf_token": token})


def signed_in(app, client, who: str):
    """Sign `client` in as an admin, a plain user, or nobody."""
    if who == "anonymous":
        return client
    make_user(app, who, admin=who == "admin")
    login(client, who)
    return client


def error_of(response) -> dict:
    body = response.get_json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["message"]
    return body["error"]


def app_overrides(test_env: dict, **extra) -> dict:
    """The test app's configuration, on the services named in `extra` (DATABASE_URL, REDIS_URL, …)."""
    return {
        "TESTING": True,
        "SECRET_KEY": test_env["SECRET_KEY"],
        "MODELS_FILE": test_env["MODELS_FILE"],
        "DEFAULT_MODEL": "fake",
        "PROGRESS_INTERVAL": 0.05,
        "RETRY_BASE_SECONDS": 0.01,
        "RETRY_MAX_SECONDS": 0.05,
        "RATELIMIT_ENABLED": False,
        **extra,
    }


def app_with(app, **overrides):
    config = {
        key: app.config[key]
        for key in ("SECRET_KEY", "MODELS_FILE", "DEFAULT_MODEL", "DATABASE_URL", "REDIS_URL", "TESTING")
    }
    config.update(overrides)
    if "DATABASE_URL" in overrides:
        config["SQLALCHEMY_DATABASE_URI"] = None  # derive it again from DATABASE_URL
    return create_app({k: v for k, v in config.items() if v is not None})


# Jobs and rows


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


def run_in_thread(app, task_id: int) -> threading.Thread:
    """Run one attempt of a task the way a worker would, in a thread, so the test can watch."""

    def target():
        with app.app_context():
            try:
                run_task(task_id)
            except TaskAttemptError:
                pass
            finally:
                db.session.remove()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def seed(app, rows: list[dict]) -> None:
    """Insert tasks as they would be after running, with times relative to now."""
    with app.app_context():
        user = db.session.query(User).first()
        now = utcnow()
        for row in rows:
            ago = row.pop("ago", 0)
            wait = row.pop("wait", 1.0)
            run = row.pop("run", 2.0)
            created = now - timedelta(seconds=ago + wait + run)
            finished = row.get("status") in ("COMPLETED", "FAILED", "CANCELLED")
            db.session.add(
                Task(
                    user_id=row.pop("user_id", user.id),
                    prompt="seeded",
                    model=row.pop("model", "fake"),
                    priority=5,
                    params={},
                    max_attempts=3,
                    attempts=1,
                    created_at=created,
                    started_at=created + timedelta(seconds=wait),
                    finished_at=created + timedelta(seconds=wait + run) if finished else None,
                    **row,
                )
            )
        db.session.commit()


def age(app, task_id: int, seconds: int) -> None:
    """Pretend the task was last touched `seconds` ago."""
    with app.app_context():
        past = utcnow() - timedelta(seconds=seconds)
        db.session.query(Task).filter_by(id=task_id).update({"updated_at": past, "created_at": past})
        db.session.commit()


# Waiting


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 60, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{process.args} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not come up")


# The embedded path (`make run`)

EMBEDDED_UNSET = ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "MODELS_FILE", "DEFAULT_MODEL")


def loose_modes(folder: Path) -> list[str]:
    """Everything under `folder` (itself included) that another local user could read or enter."""
    found = []
    for path in [folder, *folder.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        wanted = 0o700 if path.is_dir() else 0o600
        if mode & 0o077 or (mode | wanted) != wanted:
            found.append(f"{path.relative_to(folder.parent)} {mode:o}")
    return found


# gunicorn with the project's gunicorn.conf.py


def start_gunicorn(env: dict, log_path: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """Start gunicorn on a free port with the project's config; return the process and its base URL.

    `--preload` loads the app before gunicorn says it listens, so the first request does not wait
    for a worker to import it (many seconds on a loaded machine).
    """
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "wsgi:app", "--config", str(ROOT / "gunicorn.conf.py")]
            + ["--bind", "127.0.0.1:0", "--workers", "1", "--preload", *options],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while not (match := re.search(r"Listening at: (http://127\.0\.0\.1:\d+)", log_path.read_text())):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise AssertionError(f"gunicorn did not start:\n{log_path.read_text()}")
        time.sleep(0.1)
    return server, match.group(1)


# Reading pages and metrics


class Tags(HTMLParser):
    """Every start tag of a page, with its attributes."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def all(self, name: str) -> list[dict]:
        return [attrs for tag, attrs in self.tags if tag == name]


def scrape(client, **headers) -> dict:
    """GET /metrics and parse it with prometheus_client's own parser: {(name, labels): value}."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples
