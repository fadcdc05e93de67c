"""Batches through the official `openai` SDK, pointed at the app in a real HTTP server with a real worker.

The SDK is used as a script written for OpenAI's Batch API would use it: only `base_url` and
the key differ.
"""

from __future__ import annotations

import json
import time

import openai
import pytest
from sqlalchemy import func, select

from tests import servers
from tests.helpers import api_client
from webapp.batch_models import Batch
from webapp.extensions import db
from webapp.models import Task

server, worker = servers.server, servers.worker


def line(custom_id: str, content: str = "Hello", model: str = "fake", **body) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}], **body},
    }


def jsonl(*lines) -> bytes:
    return b"".join((item if isinstance(item, bytes) else json.dumps(item).encode()) + b"\n" for item in lines)


def sdk(app, server, username: str = "alice") -> openai.OpenAI:
    token = api_client(app, username).token
    return openai.OpenAI(base_url=f"{server}/api/v1", api_key=token, max_retries=0, timeout=30)


def until(client: openai.OpenAI, batch_id: str, statuses: set[str], timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        time.sleep(0.2)


def rows_of(content: bytes) -> list[dict]:
    return [json.loads(text) for text in content.decode().splitlines()]


@pytest.fixture
def alice(app, server, worker) -> openai.OpenAI:
    return sdk(app, server)


def test_a_file_of_requests_runs_and_its_output_comes_back(app, alice, fake_provider):
    chat = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one"},
    ]
    content = jsonl(
        line("a", "First question of seven words here", max_tokens=5),
        {**line("chat"), "body": {"model": "fake", "messages": chat, "temperature": 0.3}},
        line("c", "Third question", max_completion_tokens=3),
        line("bad-model", model="no-such-model"),
    )
    uploaded = alice.files.create(file=("requests.jsonl", content), purpose="batch")
    assert (uploaded.object, uploaded.purpose, uploaded.bytes, uploaded.filename) == (
        "file",
        "batch",
        len(content),
        "requests.jsonl",
    )
    assert alice.files.retrieve(uploaded.id).id == uploaded.id
    assert alice.files.content(uploaded.id).content == content

    batch = alice.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"project": "colours"},
    )
    assert (batch.object, batch.status, batch.metadata) == ("batch", "validating", {"project": "colours"})
    assert batch.expires_at - batch.created_at == 24 * 3600

    done = until(alice, batch.id, {"completed", "failed"})
    assert done.status == "completed", done.errors
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (4, 3, 1)
    assert done.in_progress_at and done.finalizing_at and done.completed_at and not done.failed_at

    output = {row["custom_id"]: row for row in rows_of(alice.files.content(done.output_file_id).content)}
    assert set(output) == {"a", "chat", "c"}
    first = output["a"]
    assert first["id"].startswith("batch_req_") and first["error"] is None
    assert first["response"]["status_code"] == 200 and first["response"]["request_id"]
    body = first["response"]["body"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"].startswith("Echo: First")
    assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == "length"
    assert output["c"]["response"]["body"]["usage"]["completion_tokens"] == 3

    # The chat went to the provider whole, as the line had it, with its temperature.
    sent = [call for call in fake_provider.calls if call.prompt == "Another one"]
    assert len(sent) == 1 and sent[0].body["messages"] == chat and sent[0].temperature == 0.3

    errors = rows_of(alice.files.content(done.error_file_id).content)
    assert [(row["custom_id"], row["response"], row["error"]["code"]) for row in errors] == [
        ("bad-model", None, "model_not_found")
    ]
    assert alice.files.retrieve(done.output_file_id).purpose == "batch_output"

    # Each good line was an ordinary task that knows its batch and custom_id, in the low lane.
    with app.app_context():
        tasks = db.session.scalars(select(Task).where(Task.batch_id == batch.id).order_by(Task.id)).all()
        assert [(task.custom_id, task.status, task.priority) for task in tasks] == [
            ("a", "COMPLETED", 2),
            ("chat", "COMPLETED", 2),
            ("c", "COMPLETED", 2),
        ]
        assert tasks[1].to_dict()["messages"] == chat and tasks[0].to_dict()["messages"] is None
        db.session.remove()

    with pytest.raises(openai.ConflictError, match="already completed"):
        alice.batches.cancel(batch.id)
    listed = alice.batches.list(limit=10)
    assert [item.id for item in listed.data] == [batch.id]
    assert alice.files.delete(uploaded.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(uploaded.id)


def test_a_malformed_file_fails_the_batch_with_line_numbers_and_creates_nothing(app, alice):
    content = jsonl(
        line("1"),
        b"{not json",
        line("1"),
        {**line("4"), "url": "/v1/embeddings"},
        {**line("5"), "method": "GET"},
        {**line("6"), "body": "text"},
        {"method": "POST", "url": "/v1/chat/completions", "body": {}},
    )
    uploaded = alice.files.create(file=("bad.jsonl", content), purpose="batch")
    batch = alice.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    failed = until(alice, batch.id, {"failed", "completed", "in_progress"})
    assert failed.status == "failed" and failed.failed_at
    assert [(error.line, error.code) for error in failed.errors.data] == [
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (4, "invalid_url"),
        (5, "invalid_method"),
        (6, "invalid_request"),
        (7, "missing_custom_id"),
    ]
    assert all(error.message for error in failed.errors.data)
    assert failed.output_file_id is None and failed.error_file_id is None
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Task)) == 0
        db.session.remove()


def test_a_cancel_mid_way_keeps_what_finished(app, alice, fake_provider):
    slow = '#fake {"chunks": 4, "delay": 0.5}\nslow'
    content = jsonl(line("quick-1"), line("quick-2"), *[line(f"slow-{n}", slow, model="fake-narrow") for n in range(8)])
    uploaded = alice.files.create(file=("mixed.jsonl", content), purpose="batch")
    batch = alice.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 30
    while alice.batches.retrieve(batch.id).request_counts.completed < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)

    cancelled = alice.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelling_at
    cancelled = until(alice, batch.id, {"cancelled"})
    counts = cancelled.request_counts
    assert counts.total == 10 and counts.completed >= 2 and counts.completed + counts.failed == 10
    assert counts.failed >= 1  # slow lines were still queued or running
    output = [row["custom_id"] for row in rows_of(alice.files.content(cancelled.output_file_id).content)]
    assert {"quick-1", "quick-2"} <= set(output)
    errors = rows_of(alice.files.content(cancelled.error_file_id).content)
    assert errors and {row["error"]["code"] for row in errors} == {"batch_cancelled"}
    assert len(output) + len(errors) == 10
    with app.app_context():
        unfinished = db.session.scalar(
            select(func.count()).select_from(Task).where(Task.status.in_(("PENDING", "PROCESSING")))
        )
        assert unfinished == 0
        db.session.remove()
    assert alice.batches.cancel(batch.id).status == "cancelled"  # again: nothing more to do


def test_another_users_batch_and_file_are_not_found(app, server, alice):
    uploaded = alice.files.create(file=("mine.jsonl", jsonl(line("x"))), purpose="batch")
    batch = alice.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    bob = sdk(app, server, "bob")
    for call in (
        lambda: bob.files.retrieve(uploaded.id),
        lambda: bob.files.content(uploaded.id),
        lambda: bob.files.delete(uploaded.id),
        lambda: bob.batches.retrieve(batch.id),
        lambda: bob.batches.cancel(batch.id),
        lambda: bob.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert bob.batches.list().data == [] and bob.files.list().data == []
    until(alice, batch.id, {"completed"})
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Batch)) == 1
        db.session.remove()
