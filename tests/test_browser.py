"""Browser tests: Debian's Chromium, driven by Playwright, against the app in a real HTTP server,
a real `flask worker` process and the fake provider. Nothing in the page is stubbed.

Every test fails if a page throws a script error, breaks the Content-Security-Policy, opens a
dialog it did not expect, or sends a request anywhere but the app (such requests are also
blocked, so nothing ever leaves the machine). Tests wait on conditions, never on sleeps.

SCREENSHOT_DIR=docs .venv/bin/pytest tests/test_browser.py -k grow   # refresh the screenshots in docs/
"""

from __future__ import annotations

import re
import time

from tests import browser as parts
from tests.browser import expect, needs_chromium, sign_in, snap, wait_finished
from tests.helpers import make_user, task_row

pytestmark = needs_chromium
# The browser fixtures, taken by name: a server thread, a worker process, Chromium, a watched page.
browser, page, server, watch, worker = parts.browser, parts.page, parts.server, parts.watch, parts.worker
shots = parts.shots  # where screenshots go

# A realistic answer, streamed a word at a time, for the streaming test and the screenshots.
ANSWER = """A **task queue** lets a web app hand slow work to background workers, so every page answers at once.

How it works:

1. The app records the task and puts its id on a queue.
2. A worker takes the id, calls the model and writes the answer as it arrives.
3. The page polls the record until the task is finished.

```python
from rq import Queue
from redis import Redis

queue = Queue(connection=Redis())
job = queue.enqueue(summarise, "report.pdf")
```

Keep jobs *small* and idempotent: a job may run twice.
"""


def chunks(text: str) -> list[str]:
    return re.findall(r"\S+\s*|\s+", text)


def task_id_of(page) -> int:
    return int(re.search(r"/tasks/(\d+)$", page.url).group(1))


# -- the tests -----------------------------------------------------------------------------------


def test_submit_watch_the_answer_grow_then_read_it_as_markdown(page, app, fake_provider, shots):
    make_user(app)
    sign_in(page)
    prompt = "Explain what a task queue is, with a short example in Python."
    fake_provider.script(prompt, {"chunks": chunks(ANSWER), "delay": 0.1})

    page.get_by_label("Prompt", exact=True).fill(prompt)
    expect(page.locator("#prompt-count")).to_contain_text(f"{len(prompt)} of 32,000 characters")
    page.get_by_text("Advanced").click()
    page.get_by_label("Max tokens").fill("96")
    page.get_by_role("button", name="Submit").click()
    expect(page).to_have_url(re.compile(r"/tasks/\d+$"))
    task_id = task_id_of(page)

    section = page.locator(f"#task-{task_id}")
    bar = section.locator("progress")
    text = section.locator(".answer .text")
    # The answer grows and the bar moves, swapped in by htmx without reloading the page.
    expect(section).to_have_attribute("data-status", "PROCESSING")
    expect(text).to_contain_text("task queue")
    before = (len(text.inner_text()), int(bar.get_attribute("value")))
    page.wait_for_function(
        """([id, length, value]) => {
             const s = document.getElementById('task-' + id);
             const t = s && s.querySelector('.answer .text');
             return t && t.textContent.length > length && s.querySelector('progress').value > value;
           }""",
        arg=[task_id, *before],
    )
    expect(text).to_contain_text("calls the model")  # far enough in for a telling screenshot
    expect(section).to_have_attribute("data-status", "PROCESSING")
    snap(page, shots / "task-streaming.png")

    expect(section.locator(".badge")).to_have_text("Completed")
    expect(bar).to_have_attribute("value", "100")
    answer = section.locator(".answer .markdown")
    expect(answer.locator("strong").first).to_have_text("task queue")
    expect(answer.locator("ol li")).to_have_count(3)
    expect(answer.locator("pre code")).to_contain_text("queue.enqueue(summarise")
    # Finished: the partial carries no trigger, so polling has stopped.
    expect(section).not_to_have_attribute("hx-get", re.compile(".*"))
    expect(section.locator("dl.facts")).to_contain_text("1 of 3")
    snap(page, shots / "task-finished.png")

    section.get_by_role("button", name="Copy answer").click()
    expect(section.get_by_role("button", name="Copied")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == task_row(app, task_id).result == ANSWER


def test_cancel_a_running_task(page, app, fake_provider):
    make_user(app)
    sign_in(page)
    prompt = "Count slowly to two hundred."
    fake_provider.script(prompt, {"chunks": 200, "delay": 0.05})
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_role("button", name="Submit").click()
    expect(page).to_have_url(re.compile(r"/tasks/\d+$"))
    task_id = task_id_of(page)
    section = page.locator(f"#task-{task_id}")
    expect(section.locator(".answer .text")).to_contain_text("word1")

    section.get_by_role("button", name="Cancel").click()
    expect(section.locator(".badge")).to_have_text("Cancelled")
    expect(section.get_by_role("button", name="Retry")).to_be_visible()
    expect(section.get_by_role("button", name="Cancel")).to_have_count(0)
    expect(page.locator("#task-announcer")).to_contain_text("Cancelled")
    assert task_row(app, task_id).status == "CANCELLED"
    # The worker notices at its next write and hangs up on the provider.
    call = fake_provider.calls_for(prompt)[0]
    deadline = time.monotonic() + 10
    while call.outcome != "complete" and not call.disconnected:
        assert time.monotonic() < deadline, "the worker kept streaming a cancelled task"
        time.sleep(0.05)
    assert call.disconnected and call.chunks_sent < 200


def test_a_failing_poll_says_so_and_recovers(page, app, fake_provider):
    make_user(app)
    sign_in(page)
    prompt = "Keep going while the server hiccups."
    fake_provider.script(prompt, {"chunks": 60, "delay": 0.1})
    # The server "restarts": its polls answer 503 until the route is lifted.
    page.route("**/live?*", lambda route: route.fulfill(status=503, body="down for a moment"))
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_role("button", name="Submit").click()
    expect(page).to_have_url(re.compile(r"/tasks/\d+$"))
    note = page.locator("[data-poll-note]")
    expect(note).to_contain_text("Live updates paused (the server answered 503)")
    page.unroute("**/live?*")
    expect(page.locator("section.task .badge")).to_have_text("Completed")
    expect(note).to_have_count(0)


def test_a_task_page_resumes_within_seconds_of_the_server_answering_again(page, app, fake_provider):
    make_user(app)
    sign_in(page)
    prompt = "Keep going while the server restarts."
    fake_provider.script(prompt, {"chunks": 20, "delay": 0.1})
    failed = []

    def down(route):
        failed.append(route.request.url)
        route.fulfill(status=502, body="restarting")

    page.route("**/live?*", down)
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_role("button", name="Submit").click()
    expect(page).to_have_url(re.compile(r"/tasks/\d+$"))
    # A long outage: five failed polls in a row (the pause before the next has grown).
    page.wait_for_function("() => document.querySelectorAll('[data-poll-note]').length === 1")
    deadline = time.monotonic() + 30
    while len(failed) < 5:
        assert time.monotonic() < deadline, failed
        page.wait_for_timeout(100)
    page.unroute("**/live?*")
    # Back within 5 s of the server answering: the pause between tries never passes 3 s.
    expect(page.locator("section.task .badge")).to_have_text("Completed", timeout=5_000)
    expect(page.locator("[data-poll-note]")).to_have_count(0)


def test_retry_a_failed_task(page, app, fake_provider):
    make_user(app)
    sign_in(page)
    prompt = "Please fail the first time."
    # Three 503s use up the attempts; another run can succeed, so the page offers Retry.
    fake_provider.script(prompt, *[{"status": 503, "message": "The model is overloaded."}] * 3)
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_role("button", name="Submit").click()
    section = page.locator("section.task")
    expect(section.locator(".badge")).to_have_text("Failed")
    expect(section.get_by_role("alert")).to_contain_text("The model is overloaded.")
    expect(section.get_by_role("link", name="Edit and resubmit")).to_have_count(0)

    section.get_by_role("button", name="Retry").click()
    expect(section.locator(".badge")).to_have_text("Completed")
    expect(section.locator(".answer")).to_contain_text("Echo: Please fail the first time.")
    expect(section.get_by_role("button", name="Retry")).to_have_count(0)


def test_a_refused_request_offers_edit_and_resubmit(page, app, fake_provider, shots):
    make_user(app)
    sign_in(page)
    prompt = "Please refuse this one."
    fake_provider.script(prompt, {"status": 400, "message": "This model does not accept that request."})
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_role("button", name="Submit").click()
    section = page.locator("section.task")
    expect(section.locator(".badge")).to_have_text("Failed")
    expect(section.get_by_role("alert")).to_contain_text("Running it again would fail the same way")
    expect(section.get_by_role("button", name="Retry")).to_have_count(0)
    for width in (1280, 390):
        page.set_viewport_size({"width": width, "height": 900})
        expect(section.get_by_role("link", name="Edit and resubmit")).to_be_visible()
        snap(page, shots / f"task-refused-{width}.png")

    section.get_by_role("link", name="Edit and resubmit").click()
    expect(page.locator("#form-source")).to_contain_text("It failed: The provider rejected the request")
    expect(page.get_by_label("Prompt", exact=True)).to_have_value(prompt)
    page.get_by_label("Prompt", exact=True).fill("Please answer this one.")
    page.get_by_role("button", name="Submit").click()
    expect(section.locator(".badge")).to_have_text("Completed")
    expect(section.locator(".answer")).to_contain_text("Echo: Please answer this one.")


def test_a_cut_off_answer_says_so_and_keeps_its_lines(page, app, fake_provider, shots):
    make_user(app)
    sign_in(page)
    prompt = "Write a haiku, then explain it at length."
    fake_provider.script(prompt, {"chunks": ["An old silent pond\n", "A frog jumps in\n", "Splash! ", "The ", "pond"]})
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.locator("summary", has_text="Advanced").click()
    page.get_by_label("Max tokens").fill("4")
    page.get_by_role("button", name="Submit").click()
    section = page.locator("section.task")
    expect(section.locator(".badge")).to_have_text("Completed")
    expect(section).to_contain_text("Cut off at 4 tokens: raise max tokens and resubmit.")
    expect(section.locator(".markdown br")).to_have_count(2)  # the poem keeps its lines
    for width in (1280, 390):
        page.set_viewport_size({"width": width, "height": 900})
        snap(page, shots / f"task-cut-off-{width}.png")
    section.get_by_role("link", name="Edit and resubmit").click()
    expect(page.get_by_label("Max tokens")).to_have_value("8")


def test_a_validation_error_keeps_what_was_typed(page, app):
    make_user(app)
    sign_in(page)
    typed = "A prompt I took a while to write,\nover two lines."
    page.get_by_label("Prompt", exact=True).fill(typed)
    page.get_by_label("Model", exact=True).select_option("fake-small")
    page.get_by_label("Priority").select_option("9")
    page.get_by_text("Advanced").click()
    page.get_by_label("Max tokens").fill("500")
    page.get_by_label("System prompt").fill("Answer briefly.")
    page.get_by_role("button", name="Submit").click()

    expect(page.locator("#max_tokens-error")).to_have_text("max_tokens for fake-small is at most 16.")
    expect(page.get_by_label("Max tokens")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Prompt", exact=True)).to_have_value(typed)
    expect(page.get_by_label("Model", exact=True)).to_have_value("fake-small")
    expect(page.get_by_label("Priority")).to_have_value("9")
    expect(page.get_by_label("System prompt")).to_have_value("Answer briefly.")
    assert page.url.endswith("/tasks")  # the form came back; nothing was submitted

    page.get_by_label("Prompt", exact=True).fill("   ")
    page.get_by_label("Max tokens").fill("")
    page.get_by_role("button", name="Submit").click()
    expect(page.locator("#prompt-error")).to_have_text("Enter a prompt.")


XSS = (
    '<script>alert("s1")</script><img src=/xss-img onerror=alert("s2")>'
    '<a href="javascript:alert(\'s3\')">j</a><div hx-get="/xss-htmx" hx-trigger="load">h</div>'
    "<svg onload=alert('s4')></svg>"
)
XSS_ANSWER = [
    "Here: ",
    '<script>alert("a1")</script> ',
    '<img src=/xss-answer-img onerror=alert("a2")> ',
    "[click me](javascript:alert('a3')) ",
    "![pixel](http://evil.invalid/pixel.png) ",
    '<div hx-get="/xss-answer-htmx" hx-trigger="load">x</div> ',
    '<a hx-post="/logout" hx-trigger="load">bye</a> ',
    "<iframe src=/xss-frame></iframe>",
]


def test_script_in_a_prompt_or_an_answer_stays_inert(page, app, fake_provider, watch):
    make_user(app)
    sign_in(page)
    fake_provider.script(XSS, {"chunks": XSS_ANSWER, "delay": 0.3})
    page.get_by_label("Prompt", exact=True).fill(XSS)
    page.get_by_role("button", name="Submit").click()
    expect(page).to_have_url(re.compile(r"/tasks/\d+$"))
    task_id = task_id_of(page)
    section = page.locator(f"#task-{task_id}")
    # While it streams (escaped text), and once finished (sanitised Markdown).
    expect(section.locator(".answer .text")).to_contain_text('alert("a1")')
    expect(section.locator(".badge")).to_have_text("Completed")
    expect(section.locator(".answer")).to_contain_text("click me")
    page.goto("/tasks")
    expect(page.locator(f"#row-{task_id}")).to_contain_text("<script>")
    page.goto(f"/tasks/{task_id}")
    expect(page.locator(".prompt .text")).to_contain_text('<script>alert("s1")</script>')

    assert not watch.dialogs
    assert not [path for path in watch.paths() if "xss" in path or path == "/logout"], watch.paths()
    answer = page.locator(".answer")
    assert answer.locator("script, img, iframe, svg, [onerror], [hx-get], [hx-post]").count() == 0
    assert page.locator("a[href^='javascript']").count() == 0
    assert page.locator(".prompt script, .prompt img").count() == 0
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()  # still signed in


def test_another_users_task_is_not_found(page, app, api):
    task = api.submit("alice's private prompt")
    make_user(app, "mallory")
    sign_in(page, "mallory")
    response = page.goto(f"/tasks/{task['id']}")
    assert response.status == 404
    expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    expect(page.get_by_role("navigation", name="Main")).to_be_visible()  # the site's own look
    expect(page.locator("body")).not_to_contain_text("alice's private prompt")
    assert page.request.get(f"/tasks/{task['id']}/live").status == 404
    wait_finished(app, task["id"])


def test_history_filters_pages_and_live_rows(page, app, api, fake_provider, shots, monkeypatch):
    monkeypatch.setitem(app.config, "HISTORY_PAGE_SIZE", 6)
    fake_provider.script("finished prompt number 5", {"status": 400, "message": "The model is not available."})
    for n in range(7):
        api.submit(f"finished prompt number {n}")
    slow = "Summarise the week's support tickets by theme"
    fake_provider.script(slow, {"chunks": 50, "delay": 0.1})
    live = api.submit(slow)
    sign_in(page)
    page.get_by_role("link", name="History").click()
    row = page.locator(f"#row-{live['id']}")
    rows = page.locator("table.history tbody tr")
    # The unfinished row updates itself until its task completes.
    expect(row.locator(".badge")).to_have_text("Processing")
    snap(page, shots / "history.png")
    expect(row.locator(".badge")).to_have_text("Completed")
    expect(row).not_to_have_attribute("hx-get", re.compile(".*"))
    expect(rows).to_have_count(6)

    page.get_by_role("link", name="Older →").click()
    expect(rows).to_have_count(2)
    page.get_by_role("link", name="← Newer").click()
    expect(rows).to_have_count(6)
    expect(rows.first).to_have_id(f"row-{live['id']}")

    # Filters apply as you type (htmx), and the address keeps them.
    page.get_by_label("Search prompts").fill("number 1")
    expect(rows).to_have_count(1)
    expect(page).to_have_url(re.compile(r"q=number(\+|%20)1"))
    page.get_by_label("Search prompts").fill("number")
    page.get_by_label("Status").select_option("FAILED")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("finished prompt number 5")
    page.get_by_label("Search prompts").fill("no such words")
    expect(page.locator("#results")).to_contain_text("No tasks match these filters.")


def test_api_tokens_create_copy_list_revoke(page, app, watch):
    make_user(app)
    sign_in(page)
    page.get_by_role("link", name="API tokens").click()
    page.get_by_label("Name").fill("nightly report")
    page.get_by_role("button", name="Create token").click()
    token = page.get_by_label("New API token").input_value()
    assert token.startswith("atr_")
    page.get_by_role("button", name="Copy", exact=True).click()
    assert page.evaluate("navigator.clipboard.readText()") == token
    row = page.locator("table.tokens tbody tr")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("nightly report")
    expect(row).to_contain_text(token[:10])
    expect(row).not_to_contain_text(token[12:])  # only the prefix is ever shown again

    auth = {"Authorization": f"Bearer {token}"}
    assert page.request.get("/api/v1/tasks", headers=auth).status == 200
    page.goto("/tokens")
    expect(page.get_by_label("New API token")).to_have_count(0)  # shown once
    expect(row).to_have_count(1)

    watch.accept_dialogs = True  # "Revoke the token …?"
    row.get_by_role("button", name="Revoke nightly report").click()
    expect(page.get_by_text("The token is revoked")).to_be_visible()
    assert watch.dialogs == ["confirm: Revoke the token “nightly report”? Scripts using it stop working at once."]
    assert page.request.get("/api/v1/tasks", headers=auth).status == 401
