"""A real HTTP server running the app, and a real `flask worker` process: for browser and SDK tests.

Test modules take the fixtures by name (`server, worker = servers.server, servers.worker`).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from rq import Worker
from werkzeug.serving import make_server

from tests.helpers import ROOT, redis_conn


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
