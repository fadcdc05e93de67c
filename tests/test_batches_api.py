"""Files and batches: every bad input is a clear 4xx envelope and leaves nothing half-created."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from tests.helpers import api_client, app_with, error_of, work
from webapp.batch_models import Batch, BatchLineError, FileChunk, StoredFile
from webapp.extensions import db
from webapp.models import Task, utcnow

GOOD = {
    "custom_id": "1",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {"model": "fake", "messages": [{"role": "user", "content": "Hi"}]},
}


def upload(api, content: bytes, purpose: str = "batch", filename: str = "in.jsonl"):
    return api.post("/files", data={"file": (io.BytesIO(content), filename), "purpose": purpose})


def counts(app) -> dict:
    with app.app_context():
        found = {
            model.__tablename__: db.session.scalar(select(func.count()).select_from(model))
            for model in (StoredFile, FileChunk, Batch, BatchLineError, Task)
        }
        db.session.remove()
        return found


NOTHING = {"files": 0, "file_chunks": 0, "batches": 0, "batch_line_errors": 0, "tasks": 0}


def line(custom_id: str, **body) -> bytes:
    return json.dumps({**GOOD, "custom_id": custom_id, "body": {**GOOD["body"], **body}}).encode() + b"\n"


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"prompt,model\nhello,fake\n", "not JSONL"),
        (b"[1, 2, 3]\n", "not JSONL"),
        (b"", "empty"),
        (b"\n\n  \n", "empty"),
        (b"\xff\xfe{}\n", "UTF-8"),
        (line("1") + b'{"custom_id": "\x00"}\n', "NUL"),
        (line("1") + b'{"x": "' + b"a" * (1024 * 1024) + b'"}\n', "Line 2 is longer than the 1 MiB limit"),
        (b"{}\n" * 50_001, "more than 50,000 requests"),
    ],
)
def test_a_file_that_is_not_a_batch_file_is_refused_whole(app, api, content, words):
    response = upload(api, content)
    assert response.status_code == 422
    assert words in error_of(response)["message"]
    assert counts(app) == NOTHING


def test_the_largest_file_is_accepted_whole_and_one_byte_more_is_a_413(app, api):
    exactly = b"{}\n" * 50_000
    small = app_with(app, FILE_MAX_BYTES=len(exactly))
    client = small.test_client()
    response = client.post(
        "/api/v1/files", headers=api.headers, data={"file": (io.BytesIO(exactly), "a.jsonl"), "purpose": "batch"}
    )
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["bytes"] == len(exactly)
    over = client.post(
        "/api/v1/files",
        headers=api.headers,
        data={"file": (io.BytesIO(exactly + b"{}"), "a.jsonl"), "purpose": "batch"},
    )
    assert over.status_code == 413 and "larger than" in error_of(over)["message"]
    # A body past the file limit and its envelope is refused before it is read.
    whole = client.post(
        "/api/v1/files",
        headers=api.headers,
        data={"file": (io.BytesIO(exactly * 30), "a.jsonl"), "purpose": "batch"},
    )
    assert whole.status_code == 413
    assert counts(app)["files"] == 1


def test_an_upload_is_not_held_to_the_one_mib_body_limit(app, api):
    content = line("x", temperature=0.5) * 1 + b"".join(line(f"n{i}") for i in range(1, 30_000))
    assert len(content) > 2 * 1024 * 1024
    response = upload(api, content)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["bytes"] == len(content)
    assert api.get(f"/files/{response.get_json()['id']}/content").data == content
    # Other calls keep the 1 MiB limit.
    assert api.post("/tasks", json={"prompt": "x" * (2 * 1024 * 1024)}).status_code == 413


def test_a_wrong_purpose_or_no_file_is_a_422(app, api):
    assert "purpose must be 'batch'" in error_of(upload(api, line("1"), purpose="fine-tune"))["message"]
    missing = api.post("/files", data={"purpose": "batch"})
    assert missing.status_code == 422 and "file" in error_of(missing)["details"]
    assert counts(app) == NOTHING


@pytest.fixture
def file_id(api) -> str:
    response = upload(api, line("1") + line("2"))
    assert response.status_code == 200, response.get_json()
    return response.get_json()["id"]


def create(api, **fields):
    body = {"endpoint": "/v1/chat/completions", "completion_window": "24h", **fields}
    return api.post("/batches", json=body)


@pytest.mark.parametrize(
    ("fields", "status", "words"),
    [
        ({"endpoint": "/v1/embeddings"}, 422, "endpoint must be /v1/chat/completions"),
        ({"completion_window": "48h"}, 422, "completion_window must be '24h'"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, 422, "at most 16"),
        ({"metadata": {"k": "v" * 513}}, 422, "at most 512 characters"),
        ({"metadata": {"k" * 65: "v"}}, 422, "at most 64 characters"),
        ({"metadata": {"k": 5}}, 422, "strings"),
        ({"input_file_id": "file-nosuchfile"}, 404, "No file"),
        ({"extra": 1}, 422, "extra"),
    ],
)
def test_a_bad_batch_request_is_refused_and_creates_nothing(app, api, file_id, fields, status, words):
    response = create(api, **{"input_file_id": file_id, **fields})
    assert response.status_code == status, response.get_json()
    assert words in json.dumps(error_of(response))
    assert counts(app)["batches"] == 0


def test_another_users_file_is_not_found_and_a_body_must_be_json(app, api, file_id):
    bob = api_client(app, "bob")
    assert create(bob, input_file_id=file_id).status_code == 404
    assert bob.get(f"/files/{file_id}/content").status_code == 404
    assert bob.delete(f"/files/{file_id}").status_code == 404
    assert bob.post("/batches", data="x", headers={"Content-Type": "text/plain"}).status_code == 415
    assert counts(app)["batches"] == 0


def test_an_output_file_is_not_an_input(app, api, file_id):
    batch = create(api, input_file_id=file_id).get_json()
    work(app)
    done = api.get(f"/batches/{batch['id']}").get_json()
    work(app)
    done = api.get(f"/batches/{batch['id']}").get_json()
    assert done["status"] == "completed", done
    response = create(api, input_file_id=done["output_file_id"])
    assert response.status_code == 422 and "output file" in error_of(response)["message"]


def test_a_file_cannot_be_deleted_while_its_batch_runs_and_a_finished_batch_cannot_be_cancelled(app, api, file_id):
    batch = create(api, input_file_id=file_id).get_json()
    busy = api.delete(f"/files/{file_id}")
    assert busy.status_code == 409 and batch["id"] in error_of(busy)["message"]
    work(app)  # the intake, then the lines
    api.get(f"/batches/{batch['id']}")
    work(app)  # moving it on
    assert api.get(f"/batches/{batch['id']}").get_json()["status"] == "completed"
    finished = api.post(f"/batches/{batch['id']}/cancel")
    assert finished.status_code == 409 and "already completed" in error_of(finished)["message"]
    assert api.delete(f"/files/{file_id}").status_code == 200
    # The finished batch still reads, naming its deleted input; its output is still there.
    done = api.get(f"/batches/{batch['id']}").get_json()
    assert done["input_file_id"] == file_id
    assert len(api.get(f"/files/{done['output_file_id']}/content").data.splitlines()) == 2


def test_lines_that_cannot_run_go_to_the_error_file_and_the_rest_run(app, api):
    content = b"".join(
        [
            line("ok"),
            line("unknown", model="nope"),
            line("too-long", messages=[{"role": "user", "content": "x" * 40_000}]),
            line("tools", tools=[]),
            line("stream", stream=True),
            line("tokens", max_tokens=100_000),
            line("hot", temperature=3),
            line("image", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
            line("no-user", messages=[{"role": "system", "content": "only"}]),
            line("parts", messages=[{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]),
        ]
    )
    file_id = upload(api, content).get_json()["id"]
    batch = create(api, input_file_id=file_id).get_json()
    work(app)
    api.get(f"/batches/{batch['id']}")
    work(app)
    done = api.get(f"/batches/{batch['id']}").get_json()
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 10, "completed": 2, "failed": 8}
    errors = [json.loads(row) for row in api.get(f"/files/{done['error_file_id']}/content").data.splitlines()]
    assert [(row["custom_id"], row["error"]["code"]) for row in errors] == [
        ("unknown", "model_not_found"),
        ("too-long", "context_length_exceeded"),
        ("tools", "unsupported_parameter"),
        ("stream", "unsupported_parameter"),
        ("tokens", "invalid_parameter"),
        ("hot", "invalid_parameter"),
        ("image", "unsupported_content"),
        ("no-user", "invalid_messages"),
    ]
    assert all(row["error"]["message"] for row in errors)


def test_lists_page_with_after(app, api, file_id):
    ids = [create(api, input_file_id=file_id).get_json()["id"] for _ in range(3)]
    first = api.get("/batches?limit=2").get_json()
    assert [item["id"] for item in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    second = api.get(f"/batches?limit=2&after={first['last_id']}").get_json()
    assert [item["id"] for item in second["data"]] == [ids[0]] and second["has_more"] is False
    assert api.get("/batches?after=batch_nosuch").status_code == 404
    files = api.get("/files").get_json()
    assert files["object"] == "list" and [item["id"] for item in files["data"]] == [file_id]


def test_active_batches_are_limited_per_user(app, api, file_id):
    limited = app_with(app, BATCH_MAX_ACTIVE=1, RATELIMIT_ENABLED=True)
    client = limited.test_client()
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    assert client.post("/api/v1/batches", headers=api.headers, json=body).status_code == 200
    refused = client.post("/api/v1/batches", headers=api.headers, json=body)
    assert refused.status_code == 429 and "unfinished batches" in error_of(refused)["message"]
    assert refused.headers["Retry-After"]


def test_batches_and_files_follow_retention(app, api, file_id):
    batch = create(api, input_file_id=file_id).get_json()
    work(app)
    api.get(f"/batches/{batch['id']}")
    work(app)
    done = api.get(f"/batches/{batch['id']}").get_json()
    assert done["status"] == "completed"
    fresh = upload(api, line("new")).get_json()["id"]
    old = utcnow() - timedelta(days=8)
    with app.app_context():
        from webapp.services import batches

        db.session.execute(update(Batch).values(completed_at=old))
        db.session.execute(update(StoredFile).where(StoredFile.id != fresh).values(created_at=old))
        db.session.commit()
        assert batches.cleanup() == 2  # the batch (its tasks and output file with it) and its input
        db.session.remove()
    assert counts(app) == {**NOTHING, "files": 1, "file_chunks": 1}
    assert api.get(f"/files/{fresh}").status_code == 200
