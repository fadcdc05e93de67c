"""Every page, as a user and as an admin, in the light and the dark colour scheme: each piece of
visible text, every button and link included, reads at WCAG AA contrast (4.5:1, 3:1 for large
text), as axe-core's `color-contrast` rule computes it in real Chromium.

axe-core is vendored from npm (tests/vendor/README.md) and injected by Playwright into each page
through the DevTools protocol, which the page's Content-Security-Policy does not govern, so the
CSP stays as served. The pages are those of tests/routes.py: a new page is checked without
further ado. Each page is visited in the states that show its controls (a finished, a failed, a
running and a cancelled task; a token; a webhook endpoint with a failed delivery; the admin's
delete confirmation), and each visit is also a smoke test: the status tests/routes.py expects,
no script error, no CSP violation, no request leaving the app (tests/browser.py's `page`).

tests/test_embedded_input.py runs the whole check again on SQLite and the embedded Valkey.
"""

from __future__ import annotations

import hashlib
import io
import json
from functools import cache
from pathlib import Path

import pytest
from sqlalchemy import select

from tests import browser as parts
from tests.browser import expect, needs_chromium, sign_in, wait_finished
from tests.helpers import api_client, make_user, seed, wait_for
from tests.routes import LOGIN, OK, PUBLIC_URL, ROUTES
from webapp.extensions import db
from webapp.models import Task

pytestmark = needs_chromium
browser, page, server, watch, worker = parts.browser, parts.page, parts.server, parts.watch, parts.worker

AXE = Path(__file__).parent / "vendor" / "axe-4.14.1.min.js"
AXE_SHA256 = "29348999450cdf2849a8e70b7912fc2da85a849da39c0d0d5394f51d4a9ed95c"
# GET routes that are not pages a person opens: the API and its docs (Swagger UI's stylesheet, not
# ours), files, the metrics text, partials that
# htmx swaps into a page checked here, the sign-out form's target, and rq-dashboard (its own
# stylesheet, not ours; its pages are smoke-tested by tests/test_rq_dashboard_urls.py).
NOT_PAGES = ("/api/", "/static/", "/favicon.ico", "/metrics", "/admin/rq")
PARTIALS = {
    "/tasks/<id:task_id>/live",
    "/tasks/<id:task_id>/row",
    "/admin/stats",
    "/webhooks/<id:endpoint_id>/deliveries",
    "/batches/<batch:batch_id>/live",
    "/batches/<batch:batch_id>/<any('output.jsonl', 'errors.jsonl', 'output.csv', 'errors.csv'):name>",
}
PLACEHOLDERS = {"task_id": "tasks", "endpoint_id": "endpoints", "batch_id": "batches"}
SCHEMES = ("light", "dark")  # static/app.css follows prefers-color-scheme
# axe reports what it cannot decide as "incomplete": a label in its background's own colour
# (the invisible buttons of issue 12: "1:1 contrast ratio") is one of those, so undecided nodes
# fail too, except where axe cannot see a background in markup that has one: the server-drawn
# SVG charts (text over an SVG, tick labels of one digit) and a header cell spanning two rows.
RUN_CONTRAST = """async () => {
  const result = await axe.run(document, {runOnly: {type: "rule", values: ["color-contrast"]},
                                          resultTypes: ["violations", "incomplete"]});
  const nodes = kind => (result[kind][0] || {nodes: []}).nodes.map(node => ({
    kind: kind === "violations" ? "fails" : "undecided",
    target: node.target.join(" "),
    svg: node.element ? !!node.element.closest("svg") : node.html.startsWith("<text"),
    reason: node.any.map(check => (check.data && check.data.messageKey) || "").join(" "),
    message: node.any.map(check => check.message).join("; "),
    html: node.html.slice(0, 120)}));
  return [...nodes("violations"), ...nodes("incomplete")];
}"""


def undecidable(node: dict) -> bool:
    """What axe cannot decide for a reason of its own, not of the colours (see RUN_CONTRAST)."""
    if node["kind"] != "undecided":
        return False
    return (node["svg"] and node["reason"] in ("imgNode", "shortTextContent")) or (
        node["reason"] == "bgOverlap" and node["html"].startswith("<th rowspan=")
    )


@cache
def axe_source() -> str:
    data = AXE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == AXE_SHA256, f"{AXE.name} is not the file tests/vendor/README.md names"
    return data.decode()


def page_rules() -> list[str]:
    rules = sorted(
        rule for method, rule in ROUTES if method == "GET" and not rule.startswith(NOT_PAGES) and rule not in PARTIALS
    )
    assert "/tasks/<id:task_id>" in rules and "/admin/users" in rules
    return rules


def expected(rule: str, role: str) -> str | int:
    return ROUTES[("GET", rule)][1]["user" if role == "user" else "admin"]


def paths(rule: str, objects: dict[str, list[int]]) -> list[str]:
    """The addresses to visit for a rule: one per object in each state for a rule with an id."""
    if "<" not in rule:
        return [rule]
    start, end = rule.index("<"), rule.index(">")
    name = rule[start + 1 : end].split(":")[-1]
    return [rule[:start] + str(value) + rule[end + 1 :] for value in objects[PLACEHOLDERS[name]]]


def contrast_problems(page) -> list[str]:
    """Inject axe-core (once per document); return each node failing `color-contrast`, in both schemes."""
    if not page.evaluate("() => typeof window.axe === 'object'"):
        page.evaluate(axe_source())
    problems = []
    for scheme in SCHEMES:
        page.emulate_media(color_scheme=scheme)  # the same document, restyled: no second load
        problems += [
            f"({scheme}) {node['kind']}: {node['target']}: {node['message']} <{node['html']}>"
            for node in page.evaluate(RUN_CONTRAST)
            if not undecidable(node)
        ]
    return problems


@pytest.fixture
def objects(app, fake_provider) -> dict[str, list[int]]:
    """alice's tasks in every state, a token and a webhook endpoint with a failed delivery; root, an admin."""
    api = api_client(app, "alice")
    make_user(app, "root", admin=True)
    fake_provider.script("this one fails", {"status": 400})
    done = api.submit("What is the capital of France?")["id"]
    failed = api.submit("this one fails")["id"]
    cancelled = api.submit("cancel me", priority=1)["id"]
    api.post(f"/tasks/{cancelled}/cancel")
    for task_id in (done, failed):
        wait_finished(app, task_id)
    seed(app, [{"status": "PROCESSING", "progress": 40, "result": "Half an answer"}])  # no worker has it
    with app.app_context():
        running = db.session.scalar(select(Task.id).where(Task.status == "PROCESSING"))
    api.post("/webhooks", json={"url": PUBLIC_URL, "events": ["batch.expired"]})
    from tests.routes import _webhook  # a failed delivery, for the Resend button

    with app.app_context():
        endpoint, _ = _webhook(api.user.id)
    return {"tasks": [done, failed, cancelled, running], "endpoints": [endpoint], "batches": _batches(api)}


def _batches(api) -> list[str]:
    """alice's batches: one that failed validation, one with an answer and a failed line."""
    good = {
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "fake", "messages": [{"role": "user", "content": "Hi"}]},
    }
    lines = b"".join(
        json.dumps({**good, "custom_id": name, "body": {**good["body"], "model": model}}).encode() + b"\n"
        for name, model in (("a", "fake"), ("b", "no-such-model"))
    )
    ids = []
    for status, data in (("completed", lines), ("failed", lines + b"{broken\n")):
        uploaded = api.post("/files", data={"file": (io.BytesIO(data), "in.jsonl"), "purpose": "batch"})
        body = {
            "input_file_id": uploaded.get_json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        batch_id = api.post("/batches", json=body).get_json()["id"]
        wait_for(lambda b=batch_id, s=status: api.get(f"/batches/{b}").get_json()["status"] == s, timeout=30)
        ids.append(batch_id)
    return ids


def visit_every_page(page, role: str, objects: dict) -> list[str]:
    """Open every page as `role` (signed in already); return what fails the contrast check, by page."""
    problems = []

    def check(path: str) -> None:
        problems.extend(f"{role} {path}: {problem}" for problem in contrast_problems(page))

    for rule in page_rules():
        want = expected(rule, role)
        for path in paths(rule, objects):
            response = page.goto(path)
            if want == OK:
                assert response.status < 400, f"{role} {path}: {response.status}"
            elif want != LOGIN:
                assert response.status == want, f"{role} {path}: {response.status}, not {want}"
            expect(page.locator("h1")).to_be_visible()
            check(path)
    if role == "admin":  # the confirmation a bulk delete asks for, with its danger button
        page.goto("/admin/tasks?action=delete")
        page.get_by_label("Action").select_option("delete")
        page.get_by_role("button", name="Count matching tasks").click()
        expect(page.locator("#confirm button.danger")).to_be_visible()
        check("/admin/tasks (delete confirmation)")
    return problems


def test_every_page_reads_for_a_user_and_an_admin(page, app, objects):
    problems = []
    page.goto("/login")
    problems += [f"anonymous /login: {p}" for p in contrast_problems(page)]
    page.goto("/no/such/page")
    problems += [f"anonymous 404: {p}" for p in contrast_problems(page)]
    for role, name in (("user", "alice"), ("admin", "root")):
        page.context.clear_cookies()
        sign_in(page, name)
        problems += visit_every_page(page, role, objects)
    assert not problems, f"{len(problems)} places fail WCAG AA contrast:\n" + "\n".join(problems)


def test_the_check_sees_a_button_that_does_not_read(page, app):
    """The check can fail: a button whose label is nearly its background's colour is reported."""
    make_user(app)
    sign_in(page)
    page.evaluate(
        """() => { const b = document.querySelector("button.primary");
                   b.style.background = "#ffffff"; b.style.color = "#eeeeee"; }"""
    )
    problems = contrast_problems(page)
    assert any("button" in problem and "primary" in problem for problem in problems), problems
