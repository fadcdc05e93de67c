"""Edge input on the JSON API, as properties (hypothesis): what any text, type, size or shape of
request gets. tests/test_api.py has the single cases; these generate many of each kind.

Every property also checks that a refused request wrote nothing and queued nothing.
Derandomized, so a failure reproduces; bounded, so the suite stays fast.
"""

from __future__ import annotations

import html
import io
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event

from tests.helpers import error_of, login, redis_conn, task_row, work
from tests.tally import counts
from webapp.extensions import db
from webapp.models import Task

EXAMPLES = 100
bounded = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

# Any Unicode a JSON string can carry (lone surrogates and NUL have their own properties).
CHARACTERS = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
# The JSON values, of every type, a field can be sent.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=4,
)
# Each field and what a value of the wrong type for it is.
NOT_A_STRING = lambda v: not isinstance(v, str)  # noqa: E731
WRONG_TYPES = {
    "prompt": NOT_A_STRING,
    "model": lambda v: v is not None and not isinstance(v, str),
    "priority": lambda v: isinstance(v, bool) or not isinstance(v, int),
    "params": lambda v: v is not None and not isinstance(v, dict),
    "params.max_tokens": lambda v: v is not None and (isinstance(v, bool) or not isinstance(v, int)),
    "params.temperature": lambda v: v is not None and (isinstance(v, bool) or not isinstance(v, int | float)),
    "params.system": lambda v: v is not None and not isinstance(v, str),
}
WHITESPACE = [c for c in map(chr, range(0x3000 + 1)) if c.isspace()]


class Writes:
    """Counts the SQL statements that write (and all statements, for the 413 case) while active."""

    def __init__(self, engine):
        self.engine, self.statements, self.writes = engine, 0, 0

    def _count(self, conn, cursor, statement, parameters, context, executemany):
        self.statements += 1
        words = statement.split()
        # Recording when a token was last used is the caller's bookkeeping, not the request's content.
        if words[0].upper() in ("INSERT", "UPDATE", "DELETE") and words[:2] != ["UPDATE", "api_tokens"]:
            self.writes += 1

    def __enter__(self):
        event.listen(self.engine, "before_cursor_execute", self._count)
        return self

    def __exit__(self, *exc):
        event.remove(self.engine, "before_cursor_execute", self._count)


@pytest.fixture
def nothing_written(app):
    """Assert, per example, that a refused request wrote no row and queued no job."""
    with app.app_context():
        engine = db.engine

    def check(call):
        jobs = len(redis_conn().keys("rq:job:*"))
        with Writes(engine) as writes:
            response = call()
        assert writes.writes == 0, f"a refused request wrote to the database ({response.status})"
        assert len(redis_conn().keys("rq:job:*")) == jobs
        counts["edge inputs tried (hypothesis)"] += 1
        return response

    return check


def post_raw(api, body: str | bytes, content_type: str = "application/json"):
    return api.post("/tasks", data=body, headers={"Content-Type": content_type})


@bounded
@given(prompt=st.text(CHARACTERS, min_size=1, max_size=200).filter(str.strip))
def test_any_text_round_trips_unchanged(api, prompt):
    """Emoji, right-to-left, combining marks, control characters, every plane: stored and given back as sent."""
    response = api.post("/tasks", json={"prompt": prompt})
    counts["edge inputs tried (hypothesis)"] += 1
    assert response.status_code == 202, response.get_json()
    assert api.task(response.get_json()["id"])["prompt"] == prompt


@bounded
@given(prompt=st.text(st.sampled_from(WHITESPACE), max_size=50))
def test_empty_or_whitespace_prompts_are_422(api, nothing_written, prompt):
    response = nothing_written(lambda: api.post("/tasks", json={"prompt": prompt}))
    assert response.status_code == 422 and "prompt" in error_of(response)["details"]


@bounded
@given(text=st.text(CHARACTERS, max_size=50), bad=st.sampled_from(["\x00", "\ud800", "\udfff", "\udbff"]))
def test_nul_and_lone_surrogates_are_422_wherever_they_are(api, nothing_written, text, bad):
    for field, body in (
        ("prompt", {"prompt": text + bad}),
        ("params.system", {"prompt": "p", "params": {"system": bad + text}}),
    ):
        # ensure_ascii writes a lone surrogate as the \\ud800 escape JSON allows.
        response = nothing_written(lambda b=body: post_raw(api, json.dumps(b, ensure_ascii=True)))
        assert response.status_code == 422, response.get_json()
        assert field in error_of(response)["details"]


@pytest.mark.parametrize("character", ["x", "😀", "e\u0301"[1], "ﷺ"])
def test_the_limit_is_32000_characters_of_any_kind(api, character):
    """Characters are code points: 32,000 emoji are accepted like 32,000 letters, and one more is not."""
    assert api.post("/tasks", json={"prompt": character * 32_000}).status_code == 202
    response = api.post("/tasks", json={"prompt": character * 32_001})
    assert response.status_code == 422 and "prompt" in error_of(response)["details"]


@bounded
@given(data=st.data(), field=st.sampled_from(sorted(WRONG_TYPES)))
def test_a_wrong_type_in_any_field_is_422_naming_it(api, nothing_written, data, field):
    value = data.draw(JSON_VALUES.filter(WRONG_TYPES[field]), label=field)
    body: dict = {"prompt": "hello"}
    if field.startswith("params."):
        body["params"] = {field.split(".", 1)[1]: value}
    else:
        body[field] = value
    response = nothing_written(lambda: api.post("/tasks", json=body))
    assert response.status_code == 422, (body, response.get_json())
    assert field in error_of(response)["details"]


@bounded
@given(
    extra=st.dictionaries(
        st.text(min_size=1, max_size=12).filter(lambda k: k not in ("prompt", "model", "priority", "params")),
        JSON_VALUES,
        min_size=1,
        max_size=3,
    ),
    nested=st.booleans(),
)
def test_unknown_fields_are_422_naming_them(api, nothing_written, extra, nested):
    extra = {k: v for k, v in extra.items() if not nested or k not in ("max_tokens", "temperature", "system")}
    if not extra:
        return
    body = {"prompt": "hi", "params": extra} if nested else {"prompt": "hi", **extra}
    response = nothing_written(lambda: api.post("/tasks", json=body))
    assert response.status_code == 422
    details = error_of(response)["details"]
    assert any(name in details for name in (f"params.{k}" if nested else k for k in extra)), details


@bounded
@given(
    field=st.sampled_from(["priority", "params.max_tokens"]),
    value=st.one_of(st.integers(max_value=0), st.integers(min_value=1_000_001), st.integers(11, 1_000_000)),
)
def test_a_priority_or_max_tokens_out_of_range_is_422(api, nothing_written, field, value):
    if field == "params.max_tokens" and 1 <= value <= 1024:
        value = 1025  # within the schema, but over the model's cap: refused by the catalog
    body = (
        {"prompt": "hi", "priority": value}
        if field == "priority"
        else {"prompt": "hi", "params": {"max_tokens": value}}
    )
    response = nothing_written(lambda: api.post("/tasks", json=body))
    assert response.status_code == 422 and field in error_of(response)["details"]


@bounded
@given(model=st.text(CHARACTERS, min_size=1, max_size=100).filter(lambda m: m not in ("fake", "fake-small", "local")))
def test_an_unknown_model_is_422_listing_the_models(api, nothing_written, model):
    response = nothing_written(lambda: api.post("/tasks", json={"prompt": "hi", "model": model}))
    assert response.status_code == 422
    message = error_of(response)["details"]["model"]
    assert all(name in message for name in ("fake", "fake-small", "local"))


@bounded
@given(
    content_type=st.sampled_from(
        [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/xml",
            "text/html",
            "application/jsonp",
            "application/octet-stream",
            "image/png",
            "",
        ]
    )
)
def test_a_body_that_is_not_declared_json_is_415(api, nothing_written, content_type):
    response = nothing_written(lambda: post_raw(api, json.dumps({"prompt": "hi"}), content_type))
    assert response.status_code == 415 and error_of(response)["code"] == "unsupported_media_type"


@bounded
@given(body=JSON_VALUES.map(lambda v: json.dumps({"prompt": "hi", "x": v})), cut=st.integers(1, 10_000))
def test_malformed_json_is_400(api, nothing_written, body, cut):
    truncated = body[: min(cut, len(body) - 1)]
    response = nothing_written(lambda: post_raw(api, truncated))
    assert response.status_code == 400 and error_of(response)["message"] == "The request body is not valid JSON."


@bounded
@given(raw=st.binary(min_size=1, max_size=200))
def test_bytes_that_are_not_json_are_400_or_422(api, nothing_written, raw):
    try:
        json.loads(raw)
    except ValueError:
        expected = {400}
    else:
        expected = {422}  # valid JSON that is not a task
    response = nothing_written(lambda: post_raw(api, raw))
    assert response.status_code in expected


@bounded
@given(key=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=256, max_size=400))
def test_an_idempotency_key_over_255_characters_is_422(api, nothing_written, key):
    response = nothing_written(lambda: api.post("/tasks", json={"prompt": "hi"}, headers={"Idempotency-Key": key}))
    assert response.status_code == 422


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_2mb_body_is_413_before_the_database_or_the_provider(app, api, fake_provider, chunked):
    body = json.dumps({"prompt": "x" * (2 * 1024 * 1024)}).encode()
    with app.app_context():
        engine = db.engine
    with Writes(engine) as statements:
        if chunked:
            response = api.post(
                "/tasks",
                input_stream=io.BytesIO(body),
                headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
                environ_overrides={"wsgi.input_terminated": True},
            )
        else:
            response = post_raw(api, body)
    assert response.status_code == 413 and error_of(response)["code"] == "payload_too_large"
    # Refused before the token was even looked up: not one statement, no job, no provider call.
    assert statements.statements == 0
    assert redis_conn().keys("rq:job:*") == [] and fake_provider.calls == []


SAMPLES = [
    "Grüße 👋🏽 and 👨‍👩‍👧‍👦 family",
    "שלום עולם, مرحبا بالعالم — mixed with English",
    "\u202eright-to-left override\u202c and \u2066isolates\u2069",
    "e\u0301 vs é, a\u0308\u0304, Z\u0335\u0321a\u0336l\u0334g\u0338o",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛 and 𒀀 and 🀄",
    "tabs\tand\nnewlines\r\nand \u2028 separators",
]


def test_unicode_round_trips_through_the_worker_and_the_page(app, api, client):
    """What a user types comes back unchanged: from the API, in the model's answer, and on the page."""
    tasks = [api.submit(text) for text in SAMPLES]
    work(app)
    login(client)
    for text, task in zip(SAMPLES, tasks, strict=True):
        done = api.task(task["id"])
        assert done["prompt"] == text and done["status"] == "COMPLETED"
        assert task_row(app, task["id"]).result == "Echo: " + text  # the fake provider echoes the prompt
        page = client.get(f"/tasks/{task['id']}").text
        prompt = re.search(r'<div class="text" hx-disable>(.*?)</div>', page, re.S).group(1)
        raw_answer = re.search(r"<textarea id=\"task-\d+-raw\" hidden readonly>(.*?)</textarea>", page, re.S).group(1)
        assert html.unescape(prompt) == text and html.unescape(raw_answer) == "Echo: " + text
    with app.app_context():
        assert db.session.query(Task).count() == len(SAMPLES)
        db.session.remove()
