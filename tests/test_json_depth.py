"""Deeply nested JSON is refused (422) before it is parsed, on every API route; it never reaches
Python's recursive parser (RecursionError, a 500)."""

from __future__ import annotations

import json

import pytest

from webapp.json_depth import json_depth

LIMIT = 32


def nested_params(depth: int) -> bytes:
    inner = '{"a": ' * depth + "1" + "}" * depth
    return f'{{"prompt": "deep", "params": {inner}}}'.encode()


@pytest.mark.parametrize("depth", [40, 1_000, 100_000])
def test_deeply_nested_params_are_refused_with_a_clear_422(api, depth):
    response = api.post("/tasks", data=nested_params(depth), headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.data[:200]
    error = response.get_json()["error"]
    assert error["code"] == "validation_error"
    assert f"more than {LIMIT} levels" in error["message"] and error["details"] == {"body": f"at most {LIMIT} levels"}
    assert api.get("/tasks").get_json()["items"] == []  # nothing half-written


@pytest.mark.parametrize(
    "path", ["/tasks", "/tasks/1/cancel", "/tasks/1/retry", "/tasks?limit=5", "/models", "/health"]
)
def test_every_api_route_refuses_it(api, path):
    body = b"[" * 5_000 + b"]" * 5_000
    response = api.post(path, data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, (path, response.status)


def test_brackets_inside_strings_do_not_count_and_normal_bodies_pass(api):
    prompt = "[[[{{{" * 1_000 + '\\" ]]] }}}'
    task = api.submit(prompt, params={"max_tokens": 5, "system": "{[(" * 100})
    assert task["prompt"] == prompt


def test_the_depth_is_measured_without_parsing():
    assert json_depth(b'{"a": [1, {"b": "[[[["}], "c": {}}', 10) == 3
    assert json_depth(b"[]" * 100_000, 10) == 1
    assert json_depth(b"[" * 10**6, 32) > 32  # unclosed: still deep
    assert json_depth(b"[[[]" * 1000, 32) > 32
    assert json_depth(b'{"a": [}', 32) == 2  # a mere mismatch: shallow, left for the parser to refuse
    assert json_depth(b'"\\"[[[["', 10) == 0
    assert json_depth(json.dumps({"x": [[[["y"]]]]}).encode(), 10) == 5


def test_unclosed_nesting_is_refused_and_a_mismatch_is_malformed(api):
    deep = api.post("/tasks", data=b'{"prompt": "x", "params": ' + b"[" * 100_000, content_type="application/json")
    assert deep.status_code == 422
    broken = api.post("/tasks", data=b'{"prompt": "x", "params": [}', content_type="application/json")
    assert broken.status_code == 400 and broken.get_json()["error"]["code"] == "bad_request"
