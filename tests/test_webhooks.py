"""Webhook endpoints through the API: add, list, delete, and every refusal with its reason."""

from __future__ import annotations

import base64

import pytest

from tests.helpers import api_client, app_with
from webapp.webhook_models import EVENT_TYPES


@pytest.fixture
def loopback(app):
    """Allow receivers on loopback (WEBHOOK_ALLOW_LOOPBACK=true), as development and tests do."""
    app.config["WEBHOOK_ALLOW_LOOPBACK"] = True
    yield
    app.config["WEBHOOK_ALLOW_LOOPBACK"] = False


def add(api, url="http://127.0.0.1:9/hooks", events=("task.completed",), **extra):
    return api.post("/webhooks", json={"url": url, "events": list(events), **extra})


def test_add_answers_201_with_a_secret_shown_once(api, loopback):
    response = add(api, events=EVENT_TYPES, description="CRM")
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert body["url"] == "http://127.0.0.1:9/hooks"
    assert body["events"] == list(EVENT_TYPES)
    assert body["description"] == "CRM" and body["enabled"] is True
    secret = body["secret"]
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) >= 24

    listed = api.get("/webhooks").get_json()["items"]
    assert [item["id"] for item in listed] == [body["id"]]
    assert "secret" not in listed[0] and secret not in str(listed)


def test_each_endpoint_has_its_own_secret(api, loopback):
    first, second = add(api).get_json(), add(api).get_json()
    assert first["secret"] != second["secret"]


def test_delete_answers_204_and_another_users_endpoint_is_404(app, api, loopback):
    endpoint = add(api).get_json()
    bob = api_client(app, "bob")
    assert bob.delete(f"/webhooks/{endpoint['id']}").status_code == 404
    assert bob.get("/webhooks").get_json()["items"] == []
    assert api.delete(f"/webhooks/{endpoint['id']}").status_code == 204
    assert api.get("/webhooks").get_json()["items"] == []
    assert api.delete(f"/webhooks/{endpoint['id']}").status_code == 404


def test_the_api_needs_a_token(client):
    assert client.get("/api/v1/webhooks").status_code == 401
    assert (
        client.post("/api/v1/webhooks", json={"url": "https://example.com", "events": ["task.completed"]}).status_code
        == 401
    )


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("not a url", "spaces"),
        ("example.com/hooks", "http:// or https://"),
        ("ftp://example.com/hooks", "scheme 'ftp'"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("javascript:alert(1)", "scheme 'javascript'"),
        ("http://", "no host"),
        ("http://example.com:99999/", "not a URL"),
        ("https://user:pw@example.com/", "user name or password"),
        ("https://example.com/" + "a" * 2100, "limit is 2,048"),
        ("http://10.0.0.1/hooks", "private"),
        ("http://192.168.1.1/hooks", "private"),
        ("http://172.16.0.5/", "private"),
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://127.0.0.1:5000/", "loopback"),
        ("http://localhost:5000/", "loopback"),
        ("http://[::1]/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://[::ffff:10.0.0.1]/", "private"),
        ("http://[::ffff:169.254.169.254]/", "metadata"),
        ("http://[fe80::1]/", "link-local"),
        ("http://[fc00::1]/", "private"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://[::]/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://[ff02::1]/", "multicast"),
        ("http://240.0.0.1/", "private"),
        ("http://100.64.0.1/", "not a public address"),
        ("http://[64:ff9b::a00:1]/", "private"),
        ("http://[2002:7f00:1::]/", "loopback"),
    ],
)
def test_a_refused_url_is_422_with_the_reason(api, url, reason):
    response = add(api, url=url)
    assert response.status_code == 422, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "validation_error"
    assert reason in error["details"]["url"], error
    assert api.get("/webhooks").get_json()["items"] == []


def test_loopback_is_allowed_only_with_the_setting(api, loopback):
    assert add(api, url="http://127.0.0.1:5000/").status_code == 201
    assert add(api, url="http://[::1]:5000/").status_code == 201
    # Other internal ranges stay refused even then.
    assert add(api, url="http://10.0.0.1/").status_code == 422
    assert add(api, url="http://169.254.169.254/").status_code == 422


@pytest.mark.parametrize(
    ("events", "field_text"),
    [
        (["task.exploded"], "Unknown event type 'task.exploded'"),
        (["task.completed", "TASK.FAILED"], "Unknown event type 'TASK.FAILED'"),
        ([], "Choose one or more events"),
        ("task.completed", "valid list"),
        ([1], "valid string"),
    ],
)
def test_an_unknown_or_missing_event_type_is_422(api, loopback, events, field_text):
    response = api.post("/webhooks", json={"url": "http://127.0.0.1:9/", "events": events})
    assert response.status_code == 422
    details = response.get_json()["error"]["details"]
    assert any(field_text in str(value) for value in details.values()), details


@pytest.mark.parametrize(
    "body",
    [
        {"events": ["task.completed"]},
        {"url": "http://127.0.0.1:9/"},
        {"url": 5, "events": ["task.completed"]},
        {"url": "http://127.0.0.1:9/", "events": ["task.completed"], "secret": "mine"},
        {"url": "http://127.0.0.1:9/", "events": ["task.completed"], "description": "x" * 201},
        {"url": "http://127.0.0.1:9/", "events": ["task.completed"], "description": "a\x00b"},
        ["http://127.0.0.1:9/"],
    ],
)
def test_a_malformed_body_is_a_4xx_envelope(api, loopback, body):
    response = api.post("/webhooks", json=body)
    assert response.status_code == 422, response.get_json()
    assert set(response.get_json()["error"]) == {"code", "message", "details"}
    assert api.get("/webhooks").get_json()["items"] == []


def test_not_json_is_415_and_bad_json_400(api):
    assert api.post("/webhooks", data="url=x", headers={"Content-Type": "text/plain"}).status_code == 415
    bad = api.post("/webhooks", data="{", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400


def test_an_eleventh_endpoint_is_422(app, api, loopback):
    for _ in range(10):
        assert add(api).status_code == 201
    response = add(api)
    assert response.status_code == 422
    assert "Delete one" in response.get_json()["error"]["message"]
    assert len(api.get("/webhooks").get_json()["items"]) == 10
    # The cap is per user.
    assert add(api_client(app, "bob")).status_code == 201


def test_the_openapi_document_lists_the_webhook_and_stream_calls(client):
    paths = client.get("/api/v1/openapi.json").get_json()["paths"]
    assert {"post", "get"} <= set(paths["/api/v1/webhooks"])
    assert "delete" in paths["/api/v1/webhooks/{webhook_id}"]
    assert "get" in paths["/api/v1/tasks/{task_id}/events"]


@pytest.mark.parametrize("bad", ["5,five", "5,-1", "1h"])
def test_a_bad_retry_schedule_stops_the_start(app, bad):
    with pytest.raises(ValueError, match="WEBHOOK_RETRY_DELAYS"):
        app_with(app, WEBHOOK_RETRY_DELAYS=bad)
