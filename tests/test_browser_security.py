"""Hostile text in a real browser: every payload of tests/payloads.py as a prompt and as a model's
answer (streaming, then Markdown), a provider's error message and a History search, seen by the
user on the task page and History, and by an admin on the admin pages and rq-dashboard.

The fixtures of tests/browser.py fail a test on any dialog, script error, Content-Security-
Policy violation or request to another origin. These tests also fail on any htmx request the
app did not render and any request whose address carries a payload's marker.
"""

from __future__ import annotations

import re
import time
from urllib.parse import unquote, urlsplit

import pytest

from tests import browser as parts
from tests.browser import expect, needs_chromium, sign_in, wait_finished
from tests.helpers import api_client, make_user, task_row
from tests.payloads import PAYLOADS
from tests.tally import counts

pytestmark = needs_chromium
# The browser fixtures, taken by name: a server thread, a worker process, Chromium, a watched page.
browser, page, server, watch, worker = parts.browser, parts.page, parts.server, parts.watch, parts.worker

# The htmx requests our templates render: a task's and a row's polls, its actions, History's filters, the stats.
RENDERED_HTMX = re.compile(r"^/tasks/\d+/(live|row|cancel|retry)$|^/tasks$|^/admin/stats$")
# Markup a payload would leave in the page had it become markup.
HOSTILE = (
    "script:not([src]), iframe, object, embed, svg, math, base, style, img, form[action*=evil], "
    "[onerror], [onload], [ontoggle], [onmouseover], [hx-get*=xss], [hx-post='/logout'], [data-hx-get], "
    "[hx-vals], a[href^='javascript' i], a[href^='data' i], a[href^='vbscript' i]"
)


@pytest.fixture
def requests(page):
    """Every request's path and whether htmx sent it."""
    seen: list[tuple[str, bool]] = []
    page.on("request", lambda request: seen.append((request.url, "hx-request" in request.headers)))
    return seen


def check_requests(seen: list[tuple[str, bool]], origin: str) -> None:
    for url, by_htmx in seen:
        path = unquote(urlsplit(url).path)
        # (History's search sends what was typed in its query string: that is the user's request.)
        assert "xss" not in path and "evil" not in url, f"a payload made a request: {url}"
        if by_htmx:
            assert url.startswith(origin) and RENDERED_HTMX.match(path), f"htmx request the app did not render: {url}"


def assert_no_hostile_markup(page) -> None:
    found = page.evaluate(f"Array.from(document.querySelectorAll({HOSTILE!r})).map(e => e.outerHTML.slice(0, 200))")
    assert not found, found


def test_payloads_stay_text_for_the_user(page, app, fake_provider, server, requests, watch, monkeypatch):
    monkeypatch.setitem(app.config, "HISTORY_PAGE_SIZE", 100)
    api = api_client(app)
    # One task per payload, answering with the payload itself (so each is rendered as Markdown),
    # one that streams all of them, and one whose provider error says all of them.
    for payload in PAYLOADS:
        fake_provider.script(payload, {"chunks": [payload]})
    everything = "\n\n".join(PAYLOADS)
    fake_provider.script("all at once", {"chunks": PAYLOADS, "delay": 0.15})  # 6 s (the model times out at 10)
    fake_provider.script("the provider refuses", {"status": 400, "message": everything[:2000]})
    # In the high queue, so the worker takes them first: the page watches the first one stream.
    streaming = api.submit("all at once", priority=10, params={"system": everything})
    refused = api.submit("the provider refuses", priority=10)
    tasks = [api.submit(payload) for payload in PAYLOADS]

    sign_in(page)
    deadline = time.monotonic() + 30
    while task_row(app, streaming["id"]).status == "PENDING":
        assert time.monotonic() < deadline, "the worker did not start the task"
        time.sleep(0.05)
    page.goto(f"/tasks/{streaming['id']}")
    section = page.locator(f"#task-{streaming['id']}")
    expect(section.locator(".answer .text")).to_contain_text('alert("xss-script")')  # escaped while it streams
    assert_no_hostile_markup(page)
    expect(section.locator(".badge")).to_have_text("Completed")
    expect(section.locator(".answer .markdown")).to_contain_text("md")
    expect(page.locator(".prompt > .text")).to_have_text("all at once")
    assert_no_hostile_markup(page)

    wait_finished(app, refused["id"])
    page.goto(f"/tasks/{refused['id']}")
    expect(page.locator("section.task .badge")).to_have_text("Failed")
    expect(page.locator("section.task")).to_contain_text('<script>alert("xss-script")</script>')
    assert_no_hostile_markup(page)

    for task, payload in zip(tasks, PAYLOADS, strict=True):
        wait_finished(app, task["id"])
        page.goto(f"/tasks/{task['id']}")
        expect(page.locator("section.task .badge")).to_have_text("Completed")
        assert page.locator(".prompt > .text").text_content() == payload  # shown exactly as typed
        assert task_row(app, task["id"]).result == payload
        assert_no_hostile_markup(page)
        counts["payloads shown in a browser"] += 1

    page.goto("/tasks")
    expect(page.locator("table.history tbody tr")).to_have_count(len(PAYLOADS) + 2)
    assert_no_hostile_markup(page)
    search = page.get_by_label("Search prompts")
    for payload in ('<script>alert("xss-script")</script>', "<img src=", "{{ 7*7 }}", "[md](javascript:"):
        search.fill(payload)
        expect(page).to_have_url(re.compile(r"q="))
        # The search ignores case: the newest match may be the JaVaScRiPt one.
        expect(page.locator("table.history tbody tr").first).to_contain_text(re.compile(re.escape(payload), re.I))
        assert_no_hostile_markup(page)
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()  # nothing signed us out
    check_requests(requests, server)
    assert any(by_htmx for _, by_htmx in requests)  # htmx did run: the check above saw its requests


def test_payloads_stay_text_for_an_admin_and_in_rq_dashboard(page, app, fake_provider, server, requests):
    api = api_client(app)
    make_user(app, "root", admin=True)
    fake_provider.script(PAYLOADS[0], {"status": 400, "message": "\n".join(PAYLOADS)})
    for payload in PAYLOADS[:8]:
        api.submit(payload)
    cancelled = api.submit('#fake {"chunks": 50, "delay": 0.1}\nslow, to cancel')
    api.post(f"/tasks/{cancelled['id']}/cancel")
    for task in api.get("/tasks").get_json()["items"]:
        wait_finished(app, task["id"])

    sign_in(page, "root")
    page.goto("/admin")
    expect(page.get_by_role("heading", name="Operations")).to_be_visible()
    assert_no_hostile_markup_outside_charts(page)
    page.goto("/admin/tasks")
    page.get_by_label("Model").fill(PAYLOADS[0])
    page.get_by_role("button", name="Count matching tasks").click()
    expect(page.locator("main")).to_contain_text("alert")
    assert_no_hostile_markup_outside_charts(page)
    page.goto("/admin/users")
    expect(page.locator("main")).to_contain_text("alice")

    # rq-dashboard, with finished, failed and cancelled jobs; its own script runs under its policy.
    page.goto("/admin/rq/")
    expect(page.locator("table tbody tr").first).to_contain_text(re.compile("default|high|low"))
    for registry in ("finished", "failed", "canceled"):
        page.goto(f"/admin/rq/0/view/jobs/default/{registry}/8/asc/1")
        expect(page.locator("#jobs tbody tr").first).to_contain_text(re.compile(r"task \d+|No jobs"))
    page.goto("/admin/rq/0/view/jobs/default/failed/8/asc/1")
    job_link = page.locator("#jobs tbody tr[data-role=job] a").first
    expect(job_link).to_be_visible()
    job_link.click()
    expect(page.locator("#job-data")).to_contain_text("TaskAttemptError")
    page.goto("/admin/rq/0/view/workers")
    expect(page.locator("table tbody tr").first).to_be_visible()
    check_requests(requests, server)


def assert_no_hostile_markup_outside_charts(page) -> None:
    """The stats page draws its charts as inline SVG: look everywhere but there."""
    found = page.evaluate(
        f"Array.from(document.querySelectorAll({HOSTILE!r})).filter(e => !e.closest('.chart, figure'))"
        ".map(e => e.outerHTML.slice(0, 200))"
    )
    assert not found, found
