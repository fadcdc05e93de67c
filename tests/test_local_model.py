"""One real generation through the built-in `local` model (SmolLM2-135M served by xllamacpp)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import ROOT, api_client, free_port, wait_http, work
from webapp import create_app


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
