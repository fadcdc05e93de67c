"""Waiting is visible: a task in its model's line says so on its page, and /admin shows each line.

A real `flask worker` process, the fake provider and Chromium, on `fake-one` (concurrency 1).
"""

from __future__ import annotations

import time

from tests import browser as parts
from tests.browser import expect, needs_chromium, sign_in, snap, wait_finished
from tests.helpers import api_client, task_row

pytestmark = needs_chromium
browser, page, server, watch, worker = parts.browser, parts.page, parts.server, parts.watch, parts.worker


def wait_until(predicate, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_task_in_its_models_line_says_how_many_are_ahead(page, app, fake_provider, tmp_path):
    from jobs.limits import model_limits

    api = api_client(app, "alice", admin=True)
    first_prompt = "Take your time with this one."
    fake_provider.script(first_prompt, {"chunks": 60, "delay": 0.1})  # holds the one slot for ~6 s
    first = api.submit(first_prompt, model="fake-one")
    wait_until(lambda: task_row(app, first["id"]).status == "PROCESSING", "the first task did not start")
    behind = [api.submit(f"Waiting {i}.", model="fake-one") for i in range(3)]
    with app.app_context():
        wait_until(lambda: model_limits().waiting(["fake-one"]) == {t["id"] for t in behind}, "the line did not form")

    sign_in(page)
    last = behind[-1]
    page.goto(f"/tasks/{last['id']}")
    section = page.locator(f"#task-{last['id']}")
    expect(section.locator(f"#task-{last['id']}-line")).to_have_text(
        "Waiting for model fake-one: 2 ahead (1 of 1 slots in use)."
    )
    expect(section).not_to_contain_text("Waiting for a worker")
    for width in (1280, 390):
        page.set_viewport_size({"width": width, "height": 900})
        snap(page, tmp_path / f"task-in-line-{width}.png")

    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto("/admin")
    row = page.locator('#model-lines tr[data-model="fake-one"]')
    expect(row.locator("[data-waiting]")).to_have_text("3")
    expect(row.locator("[data-in-use]")).to_have_text("1 of 1")

    # The page follows the line down, then the answer.
    page.goto(f"/tasks/{last['id']}")
    expect(section.locator(".badge")).to_have_text("Completed", timeout=30_000)
    expect(section.locator(".answer")).to_contain_text("Echo: Waiting 2.")
    for task in (first, *behind):
        wait_finished(app, task["id"])
    page.goto("/admin")
    expect(row.locator("[data-waiting]")).to_have_text("0")
    expect(row.locator("[data-in-use]")).to_have_text("0 of 1")
