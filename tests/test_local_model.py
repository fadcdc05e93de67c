"""One real generation through the built-in `local` model (SmolLM2-135M served by xllamacpp)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import ROOT, api_client, work
from webapp import create_app


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


@pytest.fixture(scope="module")
def local_model_url(test_env):
    url = f"http://127.0.0.1:{free_port()}/v1"
    server = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "wsgi", "local-model"],
        cwd=ROOT,
        env={**test_env, "LOCAL_MODEL_URL": url},
    )
    try:
        wait_http(url.removesuffix("/v1") + "/health", process=server)
        yield url
    finally:
        server.terminate()
        server.wait(20)


def test_the_local_model_answers(app, local_model_url):
    worker_app = create_app(
        {
            **{k: app.config[k] for k in ("SECRET_KEY", "DATABASE_URL", "REDIS_URL", "MODELS_FILE")},
            "LOCAL_MODEL_URL": local_model_url,
            "DEFAULT_MODEL": "local",
        }
    )
    api = api_client(app)
    task = api.submit("What is the capital of France?", model="local", params={"max_tokens": 24})
    work(worker_app)
    done = api.task(task["id"])
    assert done["status"] == "COMPLETED", done
    assert done["result"].strip()
    assert done["usage"]["prompt_tokens"] > 5 and 0 < done["usage"]["completion_tokens"] <= 24
