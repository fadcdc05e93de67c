"""Real servers for tests: the app in an HTTP server and a `flask worker` process (browser and SDK
tests), and `make run`'s whole stack as a process group of its own (`Stack`: the embedded
tests, and bench/first_answer.py on a fresh clone).

Test modules take the fixtures by name (`server, worker = servers.server, servers.worker`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from rq import Worker
from werkzeug.serving import make_server

from tests.helpers import EMBEDDED_UNSET, ROOT, redis_conn, wait_http

FINISHED = ("COMPLETED", "FAILED", "CANCELLED")


@pytest.fixture(scope="module")
def server(app):
    """The app in a real threaded HTTP server on a free port."""
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, name="browser-test-server", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    thread.join(10)


@pytest.fixture(scope="module")
def worker(app, test_env, tmp_path_factory):
    """A real `flask worker` process on the tests' database, Redis and model catalog."""
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "wsgi", "worker"],
            cwd=ROOT,
            env=test_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not Worker.all(connection=redis_conn()):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the worker did not start:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def embedded_env(unset: tuple[str, ...] = EMBEDDED_UNSET, **settings: str) -> dict:
    """This process's environment without what would take `make run` off its embedded defaults."""
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(settings)
    return env


class Stack:
    """`make run`'s stack (web, worker, scheduler, the local model) started the way a terminal
    starts it: a session and process group of its own, so Ctrl+C is a SIGINT to the group."""

    def __init__(
        self,
        env: dict,
        log_path: Path,
        command: tuple[str, ...] = (sys.executable, "-m", "flask", "--app", "wsgi", "serve"),
        cwd: Path | str = ROOT,
        flask: tuple[str, ...] = (sys.executable, "-m", "flask"),
    ):
        self.env, self.log_path, self.command, self.cwd, self.flask = env, Path(log_path), command, cwd, flask
        self.base = f"http://127.0.0.1:{env['PORT']}"
        self.process: subprocess.Popen | None = None

    def start(self) -> Stack:
        with self.log_path.open("w") as out:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                list(self.command),
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_healthy(self, timeout: float = 90) -> None:
        """Wait for /api/v1/health to answer 200; fail at once if the stack exited."""
        wait_http(f"{self.base}/api/v1/health", timeout=timeout, process=self.process)

    def create_token(self, user: str = "admin") -> str:
        """Create an API token with the CLI (`flask tokens create`); it is the last line printed."""
        done = subprocess.run(
            [*self.flask, "--app", "wsgi", "tokens", "create", user],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip().splitlines()[-1]

    def call(self, method: str, path: str, token: str | None = None, body: dict | None = None) -> dict:
        """Call the JSON API; return the decoded answer."""
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.base}{path}", data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def follow(
        self, token: str, body: dict, every: float = 0.1, timeout: float | None = None, t0: float | None = None
    ) -> tuple[dict, list[tuple[str, int, int, float]]]:
        """Submit a task and poll it until it finishes (or `timeout` passes); return it as last
        seen and each change seen: (status, progress, characters so far, seconds since `t0`)."""
        t0 = time.monotonic() if t0 is None else t0
        deadline = None if timeout is None else time.monotonic() + timeout
        task = self.call("POST", "/api/v1/tasks", token, body)
        seen: list[tuple[str, int, int, float]] = []
        while task["status"] not in FINISHED and (deadline is None or time.monotonic() < deadline):
            time.sleep(every)
            task = self.call("GET", f"/api/v1/tasks/{task['id']}", token)
            state = (task["status"], task["progress"], len(task["result"] or ""))
            if not seen or seen[-1][:3] != state:
                seen.append((*state, time.monotonic() - t0))
        return task, seen

    def terminate(self) -> None:
        """Stop it as a service manager does: SIGTERM to the supervisor alone."""
        self.process.send_signal(signal.SIGTERM)

    def ctrl_c(self) -> None:
        """Stop it as a terminal's Ctrl+C does: SIGINT to the whole process group."""
        os.killpg(self.pid, signal.SIGINT)

    def kill(self) -> None:
        os.killpg(self.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> int:
        """Wait for the stack to exit and return its code; kill the whole group if it does not."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def leftovers(self) -> list[str]:
        """The processes of its session still running (none once it stopped as it should)."""
        found = subprocess.run(["pgrep", "-s", str(self.pid)], capture_output=True, text=True).stdout
        return found.split()
