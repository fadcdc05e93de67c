"""The JSON API v1 contract: every endpoint, status code and error shape."""

from __future__ import annotations

import json

import pytest

from tests.helpers import api_client, error_of, redis_conn, work

TASK_FIELDS = {
    "id",
    "batch_id",
    "custom_id",
    "messages",
    "prompt",
    "model",
    "priority",
    "params",
    "status",
    "progress",
    "result",
    "error",
    "attempts",
    "usage",
    "finish_reason",
    "served_by",
    "cost_usd",
    "created_at",
    "started_at",
    "finished_at",
    "updated_at",
}


def test_submit_returns_202_location_and_the_task(api):
    response = api.post("/tasks", json={"prompt": "Hi", "priority": 9, "params": {"max_tokens": 5}})
    assert response.status_code == 202
    task = response.get_json()
    assert set(task) == TASK_FIELDS
    assert response.headers["Location"] == f"/api/v1/tasks/{task['id']}"
    assert task["status"] == "PENDING" and task["progress"] == 0 and task["attempts"] == 0
    assert task["model"] == "fake" and task["priority"] == 9
    assert task["params"] == {"max_tokens": 5}
    assert task["created_at"].endswith("Z") and task["started_at"] is None and task["usage"] is None


def test_submit_defaults(api):
    task = api.submit("Hi")
    assert task["priority"] == 5 and task["model"] == "fake" and task["params"] == {}


def test_get_task_and_its_answer(app, api):
    task = api.submit("hello world")
    work(app)
    done = api.task(task["id"])
    assert done["status"] == "COMPLETED"
    assert done["result"] == "Echo: hello world"
    assert done["progress"] == 100 and done["attempts"] == 1
    assert done["usage"]["completion_tokens"] == 3
    assert done["started_at"] and done["finished_at"] and done["finished_at"] >= done["started_at"]


def test_a_missing_task_is_404(api):
    error = error_of(api.get("/tasks/999999"))
    assert error["code"] == "not_found"


def test_another_users_task_is_404_everywhere(app, api, other_api):
    task = api.submit("mine")
    for call in (
        lambda: other_api.get(f"/tasks/{task['id']}"),
        lambda: other_api.post(f"/tasks/{task['id']}/cancel"),
        lambda: other_api.post(f"/tasks/{task['id']}/retry"),
        lambda: other_api.delete(f"/tasks/{task['id']}"),
    ):
        response = call()
        assert response.status_code == 404
        assert error_of(response)["code"] == "not_found"
    assert other_api.get("/tasks").get_json()["items"] == []
    assert api.task(task["id"])["status"] == "PENDING"


def test_admins_see_every_task(app, api):
    admin = api_client(app, "root", admin=True)
    task = api.submit("visible to admins")
    assert admin.get(f"/tasks/{task['id']}").status_code == 200


def test_list_newest_first_with_cursor_pagination(api):
    ids = [api.submit(f"prompt {i}")["id"] for i in range(5)]
    first = api.get("/tasks?limit=2").get_json()
    assert [t["id"] for t in first["items"]] == ids[::-1][:2]
    assert first["next_cursor"]
    second = api.get(f"/tasks?limit=2&cursor={first['next_cursor']}").get_json()
    assert [t["id"] for t in second["items"]] == ids[::-1][2:4]
    third = api.get(f"/tasks?limit=2&cursor={second['next_cursor']}").get_json()
    assert [t["id"] for t in third["items"]] == ids[:1]
    assert third["next_cursor"] is None


def test_list_default_limit_and_status_filter(app, api):
    for i in range(22):
        api.submit(f"p{i}")
    page = api.get("/tasks").get_json()
    assert len(page["items"]) == 20 and page["next_cursor"]
    api.post(f"/tasks/{page['items'][0]['id']}/cancel")
    cancelled = api.get("/tasks?status=CANCELLED").get_json()
    assert [t["id"] for t in cancelled["items"]] == [page["items"][0]["id"]]
    assert cancelled["next_cursor"] is None


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=abc", "status=DONE", "cursor=!!!", "cursor=aWQ6eA"])
def test_list_rejects_bad_parameters(api, query):
    response = api.get(f"/tasks?{query}")
    assert response.status_code == 422
    assert error_of(response)["code"] == "validation_error"


def test_cancel_pending_then_conflict(app, api):
    task = api.submit("cancel me")
    response = api.post(f"/tasks/{task['id']}/cancel")
    assert response.status_code == 200
    assert response.get_json()["status"] == "CANCELLED"
    again = api.post(f"/tasks/{task['id']}/cancel")
    assert again.status_code == 409
    assert error_of(again)["code"] == "conflict"
    work(app)  # the job finds the task cancelled and does nothing
    assert api.task(task["id"])["status"] == "CANCELLED"


def test_cancel_completed_is_409(app, api):
    task = api.submit("done")
    work(app)
    assert api.post(f"/tasks/{task['id']}/cancel").status_code == 409


def test_retry_only_failed_or_cancelled(app, api, fake_provider):
    task = api.submit("retry me")
    conflict = api.post(f"/tasks/{task['id']}/retry")
    assert conflict.status_code == 409 and error_of(conflict)["code"] == "conflict"
    api.post(f"/tasks/{task['id']}/cancel")
    response = api.post(f"/tasks/{task['id']}/retry")
    assert response.status_code == 202
    assert response.headers["Location"] == f"/api/v1/tasks/{task['id']}"
    assert response.get_json()["status"] == "PENDING"
    work(app)
    assert api.task(task["id"])["status"] == "COMPLETED"
    assert api.post(f"/tasks/{task['id']}/retry").status_code == 409


def test_delete(app, api):
    task = api.submit("delete me")
    response = api.delete(f"/tasks/{task['id']}")
    assert response.status_code == 204 and response.data == b""
    assert api.get(f"/tasks/{task['id']}").status_code == 404
    assert api.delete(f"/tasks/{task['id']}").status_code == 404
    work(app)  # its job finds no row and ends quietly


def test_models(api):
    body = api.get("/models").get_json()
    names = {m["name"]: m for m in body["items"]}
    assert {"fake", "fake-small", "local"} <= set(names)
    assert names["fake"]["default"] is True and names["local"]["default"] is False
    assert "base_url" not in names["fake"] and "api_key_env" not in names["fake"]


def test_health_is_public(client):
    response = client.get("/api/v1/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "healthy" and body["app_name"] == "Async AI Task Runner"
    assert body["checks"]["database"]["status"] == "ok"
    assert body["checks"]["redis"]["status"] == "ok"
    assert body["checks"]["workers"]["status"] == "none"  # no workers (the count is for admins)
    assert body["version"] is None and body["timestamp"].endswith("Z")


def test_openapi_document(client):
    doc = client.get("/api/v1/openapi.json").get_json()
    assert doc["openapi"].startswith("3.1")
    paths = doc["paths"]
    assert set(paths) >= {
        "/api/v1/tasks",
        "/api/v1/tasks/{task_id}",
        "/api/v1/tasks/{task_id}/cancel",
        "/api/v1/tasks/{task_id}/retry",
        "/api/v1/models",
        "/api/v1/health",
    }
    create = paths["/api/v1/tasks"]["post"]
    assert set(create["responses"]) >= {"202", "400", "401", "413", "415", "422"}
    schema_ref = create["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body_schema = doc["components"]["schemas"][schema_ref.rsplit("/", 1)[1]]
    # The same schema validates requests: its limits are the API's limits.
    assert body_schema["properties"]["prompt"]["maxLength"] == 32000
    assert body_schema["additionalProperties"] is False
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic YTpi"}, {"Authorization": "Bearer "}],
)
def test_401_without_a_valid_token(client, headers):
    response = client.get("/api/v1/tasks", headers=headers)
    assert response.status_code == 401
    assert error_of(response)["code"] == "unauthorized"


def test_revoked_token_and_disabled_user_are_401(app, api):
    from webapp.extensions import db
    from webapp.models import ApiToken, User

    with app.app_context():
        db.session.query(ApiToken).update({"revoked_at": db.func.now()})
        db.session.commit()
    assert api.get("/tasks").status_code == 401
    other = api_client(app, "carol")
    with app.app_context():
        db.session.query(User).filter_by(username="carol").update({"is_active": False})
        db.session.commit()
    assert other.get("/tasks").status_code == 401


def test_token_in_the_url_is_not_accepted(client, api):
    assert client.get(f"/api/v1/tasks?access_token={api.token}").status_code == 401


def test_400_malformed_json(api):
    response = api.post("/tasks", data='{"prompt": ', headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert error_of(response)["code"] == "bad_request"


def test_415_not_json(api):
    response = api.post("/tasks", data="prompt=hi", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 415
    assert error_of(response)["code"] == "unsupported_media_type"


def test_413_body_too_large_before_any_write(app, api, fake_provider):
    body = json.dumps({"prompt": "x" * (2 * 1024 * 1024)})
    response = api.post("/tasks", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert error_of(response)["code"] == "payload_too_large"
    assert api.get("/tasks").get_json()["items"] == []


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 32_001}, "prompt"),
        ({"prompt": "nul\u0000byte"}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "hi", "priority": 0}, "priority"),
        ({"prompt": "hi", "priority": 11}, "priority"),
        ({"prompt": "hi", "priority": "5"}, "priority"),
        ({"prompt": "hi", "priority": 5.5}, "priority"),
        ({"prompt": "hi", "model": "gpt-99"}, "model"),
        ({"prompt": "hi", "params": {"max_tokens": 0}}, "params.max_tokens"),
        ({"prompt": "hi", "model": "fake-small", "params": {"max_tokens": 17}}, "params.max_tokens"),
        ({"prompt": "hi", "params": {"temperature": 3}}, "params.temperature"),
        ({"prompt": "hi", "params": {"system": "s\u0000"}}, "params.system"),
        ({"prompt": "hi", "params": {"top_k": 3}}, "params.top_k"),
        ({"prompt": "hi", "colour": "blue"}, "colour"),
    ],
)
def test_422_validation_names_the_field(api, body, field):
    response = api.post("/tasks", json=body)
    assert response.status_code == 422, response.get_json()
    error = error_of(response)
    assert error["code"] == "validation_error"
    assert field in error["details"], error


def test_422_unknown_model_lists_what_exists(api):
    error = error_of(api.post("/tasks", json={"prompt": "hi", "model": "gpt-99"}))
    assert "fake" in error["details"]["model"] and "local" in error["details"]["model"]


@pytest.mark.parametrize("body", ['"just a string"', "[1, 2]", "null", "42"])
def test_422_body_must_be_an_object(api, body):
    response = api.post("/tasks", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert error_of(response)["code"] == "validation_error"


def test_lone_surrogate_is_422(api):
    response = api.post("/tasks", data='{"prompt": "bad \\ud800 text"}', headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert "prompt" in error_of(response)["details"]


def test_exactly_32000_characters_is_accepted(api):
    assert api.post("/tasks", json={"prompt": "y" * 32_000}).status_code == 202


def test_unicode_round_trips_unchanged(api):
    prompt = "Grüße 👋🏽 שלום e\u0301 — ﷽"
    task = api.submit(prompt)
    assert api.task(task["id"])["prompt"] == prompt


def test_nothing_is_written_on_validation_errors(api):
    api.post("/tasks", json={"prompt": "hi", "model": "nope"})
    assert api.get("/tasks").get_json()["items"] == []
    assert redis_conn().keys("rq:job:*") == []


def test_404_for_unknown_api_path_is_json(api):
    response = api.get("/nowhere")
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"


def test_405_is_json(api):
    response = api.client.put("/api/v1/tasks", headers=api.headers)
    assert response.status_code == 405
    assert error_of(response)["code"] == "method_not_allowed"


# --- idempotency -------------------------------------------------------------------------


def test_idempotency_key_replays_the_first_task(api):
    headers = {"Idempotency-Key": "order-1"}
    first = api.post("/tasks", json={"prompt": "once"}, headers=headers)
    second = api.post("/tasks", json={"prompt": "once"}, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.get_json()["id"] == second.get_json()["id"]
    assert len(api.get("/tasks").get_json()["items"]) == 1
    assert len(redis_conn().keys("rq:job:*")) == 1


def test_idempotency_key_with_another_body_is_422(api):
    headers = {"Idempotency-Key": "order-2"}
    api.post("/tasks", json={"prompt": "once"}, headers=headers)
    response = api.post("/tasks", json={"prompt": "twice"}, headers=headers)
    assert response.status_code == 422
    assert "Idempotency-Key" in error_of(response)["details"]


def test_idempotency_keys_are_per_user(api, other_api):
    headers = {"Idempotency-Key": "shared"}
    mine = api.post("/tasks", json={"prompt": "same"}, headers=headers).get_json()
    theirs = other_api.post("/tasks", json={"prompt": "same"}, headers=headers).get_json()
    assert mine["id"] != theirs["id"]


def test_expired_idempotency_key_makes_a_new_task(app, api):
    from datetime import timedelta

    from webapp.extensions import db
    from webapp.models import IdempotencyKey, utcnow

    headers = {"Idempotency-Key": "old"}
    first = api.post("/tasks", json={"prompt": "again"}, headers=headers).get_json()
    with app.app_context():
        db.session.query(IdempotencyKey).update({"created_at": utcnow() - timedelta(hours=25)})
        db.session.commit()
    second = api.post("/tasks", json={"prompt": "again"}, headers=headers).get_json()
    assert second["id"] != first["id"]
