"""The browser tests' parts: Debian's Chromium through Playwright, the app in a real HTTP server, a
real `flask worker` process, and a page that fails its test on any dialog, script error,
Content-Security-Policy violation or request to another origin (such requests are also refused).

Test modules take the fixtures by name (`from tests.browser import page, ...`) and mark
themselves `pytestmark = needs_chromium`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests import servers
from tests.helpers import PASSWORD, task_row

# The app in a server thread and a worker process (tests/servers.py), taken by name as before.
server, worker = servers.server, servers.worker

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")

# Without the networking flags Chromium keeps trying to reach outside hosts.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium"
)

sync_api = pytest.importorskip("playwright.sync_api")

expect = sync_api.expect
expect.set_options(timeout=15_000)


# The widths screenshots and layout checks use.
WIDTHS = {"desktop": 1280, "phone": 390}


@pytest.fixture
def shots(tmp_path) -> Path:
    """Where screenshots go: SCREENSHOT_DIR (e.g. docs/) to refresh the manual's, else a temp dir."""
    folder = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def snap(page, path: Path) -> None:
    """Screenshot the page down to the end of its content (no empty viewport below)."""
    box = page.locator("main").bounding_box()
    width = page.viewport_size["width"]
    page.screenshot(
        path=str(path), full_page=True, clip={"x": 0, "y": 0, "width": width, "height": box["y"] + box["height"]}
    )


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@dataclass
class Watch:
    """What a page did that a test may want to deny: dialogs, requests, script and CSP errors."""

    origin: str
    dialogs: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    accept_dialogs: bool = False

    def paths(self) -> list[str]:
        return [urlsplit(url).path for url in self.requests]


@pytest.fixture
def watch(server) -> Watch:
    return Watch(origin=server)


@pytest.fixture
def page(browser, server, worker, watch):
    context = browser.new_context(base_url=server, viewport={"width": 1100, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server)
    # Nothing may leave the machine: any request to another origin is recorded and refused.
    context.route(lambda url: not url.startswith(server + "/"), lambda route: route.abort())
    page = context.new_page()

    def on_dialog(dialog):
        watch.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.accept() if watch.accept_dialogs else dialog.dismiss()

    def on_console(message):
        text = message.text
        if message.type == "error" and ("Content Security Policy" in text or "Refused to" in text):
            watch.errors.append(f"CSP: {text}")

    page.on("dialog", on_dialog)
    page.on("console", on_console)
    page.on("pageerror", lambda error: watch.errors.append(f"script error: {error}"))
    page.on("request", lambda request: watch.requests.append(request.url))
    yield page
    context.close()
    assert not watch.errors, watch.errors
    outside = [url for url in watch.requests if not url.startswith(server + "/")]
    assert not outside, f"requests left the app: {outside}"
    if not watch.accept_dialogs:
        assert not watch.dialogs, f"unexpected dialogs: {watch.dialogs}"


def sign_in(page, username: str = "alice", password: str = PASSWORD) -> None:
    page.goto("/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="New task")).to_be_visible()


def wait_finished(app, task_id: int) -> None:
    """Wait for the worker to be done with a task, so no attempt outlives the test."""
    deadline = time.monotonic() + 20
    while task_row(app, task_id).status in ("PENDING", "PROCESSING"):
        assert time.monotonic() < deadline, "the task did not finish"
        time.sleep(0.05)
