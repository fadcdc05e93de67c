"""Fuzzing: the JSON API from its own OpenAPI document (schemathesis), and every browser route's
forms, query strings and path ids (hypothesis). Whatever is sent, the answer is never a 5xx.

Both run in-process against the WSGI app on the real database and Redis, authenticated (a real
API token; real sessions with their CSRF tokens, so requests get past the guards and into the
views), derandomized so a failure reproduces, and bounded so the suite stays fast.

The API fuzzing checks, for every operation, valid and invalid requests alike (schemathesis'
positive and negative generation, its boundary-value "coverage" phase and the document's
examples): no 5xx; status codes, headers, content types and bodies, errors included, as the
document says; a request without the token refused; invalid data refused. An API request that
is valid by the schema may still be refused with a 422 by rules the document cannot express
(an unknown model name, a cursor this API did not hand out, a reused Idempotency-Key, a prompt
of spaces), so 422 counts as an acceptable answer to valid data.
"""

from __future__ import annotations

import itertools
import re
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api_schema import FORWARD, schema
from tests.helpers import work
from tests.routes import FORMS, ROUTES, STATE_CHANGING, build_world, who_may
from tests.tally import counts

API_EXAMPLES = 250
PAGE_EXAMPLES = 600


@pytest.fixture
def fuzzed_app(app, api, fake_provider):
    """The real app, and tasks in every state for the fuzzer's ids (1-5) to find; yields the token header."""
    FORWARD.target = app
    fake_provider.script("fails", {"status": 400})
    for prompt in ("completed", "fails", "cancelled"):
        api.submit(prompt)
    work(app)
    api.post("/tasks/3/cancel")
    api.submit("pending")
    api.submit("another pending")
    yield api.headers


@schema.parametrize()
@settings(max_examples=API_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_the_api_answers_as_its_document_says(case, fuzzed_app):
    case.call_and_validate(headers=fuzzed_app)


def test_every_api_operation_is_fuzzed(app):
    """The schema the fuzzer saw is the app's: a new operation is fuzzed without further ado."""
    fuzzed = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    routes = {(method, re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule)) for method, rule in ROUTES}
    documented = {route for route in routes if route[1].startswith("/api/")} - {("GET", "/api/v1/openapi.json")}
    assert fuzzed == documented


# -- browser routes ----------------------------------------------------------------------------

# Every field any form has; each route is sent a mix of them (the ones it does not read are ignored).
FIELDS = sorted(
    {
        *("prompt", "model", "priority", "max_tokens", "temperature", "system", "name"),
        *("username", "password", "is_admin", "active", "admin", "action", "status"),
        *("older_than_hours", "up_to_id", "count", "q", "before", "after", "seen", "next"),
    }
)
# Values that have broken web apps: empty, NUL, numbers out of every range, not-numbers that
# Python's float() accepts, digits that are not ASCII, markup, template syntax, bidi controls.
EDGE = [
    "",
    " ",
    "\x00",
    "nul\x00byte",
    "-1",
    "0",
    "1",
    "11",
    "99999999999999999999999",
    "-99999999999999999999999",
    "1e309",
    "inf",
    "-inf",
    "nan",
    "1.5",
    "٣",
    "²",
    "FAILED",
    "retry",
    "delete",
    "on",
    "//evil.example",
    "javascript:alert(1)",
    "<script>alert(1)</script>",
    "{{7*7}}",
    "\u202eevil",
    "ﬀ",
    "a" * 5000,
]
TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)
VALUES = st.one_of(st.sampled_from(EDGE), TEXT)
IDS = st.one_of(st.integers(0, 12), st.integers(0, 2**80))


def browser_routes() -> list[tuple[str, str]]:
    return sorted(key for key in ROUTES if not key[1].startswith("/api/"))


def path_for(rule: str, ids: list, texts: list) -> str:
    """Fill a rule's parameters: numbers for <int:...> and <id:...>, any text (quoted) for the others."""
    path, ids, texts = rule, iter(ids), iter(texts)
    while "<" in path:
        start, end = path.index("<"), path.index(">")
        converter = path[start + 1 : end]
        if converter.startswith(("int:", "id:")):
            value = str(next(ids))
        elif converter.startswith("path:"):
            value = "/".join(quote(part, safe="") or "x" for part in next(texts).split("/"))
        else:
            value = quote(next(texts), safe="") or "x"
        path = path[:start] + value + path[end + 1 :]
    return path


def send(world, rule_key, path: str, fields: dict, query: dict):
    method, _ = rule_key
    caller = world.callers[who_may(rule_key)]
    client = caller.client()
    if method in STATE_CHANGING:
        data = {**fields, "csrf_token": caller.csrf}
        response = getattr(client, method.lower())(
            path, data=data, query_string=query, headers={"X-CSRFToken": caller.csrf}
        )
    else:
        response = client.get(path, query_string=query)
    counts["browser requests fuzzed"] += 1
    assert response.status_code < 500, f"{method} {path} {query} {fields!r:.300}: {response.status}"
    assert b"Traceback" not in response.get_data()
    return response


@pytest.fixture
def world(app, fake_provider):
    world = build_world(app)
    fake_provider.script("fails", {"status": 400})
    owner = world.callers["user"]
    client = owner.client()
    from tests.helpers import csrf_from

    token = csrf_from(client.get("/").text)
    for prompt in ("completed", "fails"):
        client.post("/tasks", data={"prompt": prompt, "csrf_token": token})
    work(app)
    return world


def test_every_browser_route_survives_edge_values_in_every_field(world):
    """Each edge value in every field (and as the ids and names in the path) of every route at once."""
    for rule_key, value in itertools.product(browser_routes(), EDGE):
        ids = [value if value.isascii() and value.isdecimal() else 1] * 8
        path = path_for(rule_key[1], ids, [value or "x"] * 8)
        fields = dict.fromkeys(FIELDS, value)
        send(world, rule_key, path, {**FORMS.get(path, {}), **fields}, dict.fromkeys(FIELDS, value))


@settings(max_examples=PAGE_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    rule_key=st.sampled_from(browser_routes()),
    ids=st.lists(IDS, min_size=8, max_size=8),
    texts=st.lists(TEXT, min_size=8, max_size=8),
    fields=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=8),
    query=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=4),
)
def test_every_browser_route_survives_random_input(world, rule_key, ids, texts, fields, query):
    path = path_for(rule_key[1], ids, texts)
    send(world, rule_key, path, {**FORMS.get(rule_key[1], {}), **fields}, query)
