"""What a newcomer notices, in Chromium (issue 12, points 7 and 8): no 404 for the icon, the
prompt box focused, "1 character too many", admin tables inside a 390-px phone, the Users
page's action cells aligned, Reset password confirmed first, and the interactive API docs
working under the site's Content-Security-Policy.

SCREENSHOT_DIR=/tmp/shots .venv/bin/pytest tests/test_browser_newcomer.py   # keep the screenshots
"""

from __future__ import annotations

from tests import browser as parts
from tests.browser import WIDTHS, expect, needs_chromium, sign_in
from tests.helpers import api_client, make_user

pytestmark = needs_chromium
browser, page, server, watch, worker = parts.browser, parts.page, parts.server, parts.watch, parts.worker
shots = parts.shots  # where screenshots go


def failed_requests(page) -> list[str]:
    """Record every answer of 400 or more the page gets from now on."""
    failed: list[str] = []
    page.on("response", lambda response: response.status >= 400 and failed.append(f"{response.status} {response.url}"))
    return failed


def test_the_home_page_focuses_the_prompt_and_counts_in_the_singular(page, app):
    failed = failed_requests(page)
    make_user(app)
    sign_in(page)
    expect(page.locator("#prompt")).to_be_focused()
    limit = int(page.locator("#prompt").get_attribute("data-limit"))
    page.locator("#prompt").fill("x" * (limit + 1))
    expect(page.locator("#prompt-count")).to_contain_text("1 character too many")
    page.locator("#prompt").fill("x" * (limit + 2))
    expect(page.locator("#prompt-count")).to_contain_text("2 characters too many")
    assert failed == []  # the icon included: no 404 in the console
    icon = page.request.get("/favicon.ico")
    assert icon.status == 200 and "icon" in icon.headers["content-type"]


def test_admin_pages_fit_a_phone_and_the_users_actions_line_up(page, app, shots):
    make_user(app, "root", admin=True)
    for name in ("alice", "bob"):
        api_client(app, name).submit(f"a task of {name}'s")
    sign_in(page, "root")
    for label, width in WIDTHS.items():
        page.set_viewport_size({"width": width, "height": 900})
        for path in ("/admin", "/admin/users", "/admin/tasks"):
            page.goto(path)
            expect(page.locator("h1")).to_be_visible()
            overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{path} is {overflow}px wider than a {width}px screen"
            page.screenshot(path=str(shots / f"{path.strip('/').replace('/', '-')}-{label}.png"), full_page=True)
        page.goto("/admin/users")
        cells = page.locator("#users tbody tr").first.locator("td")
        assert {cells.nth(i).evaluate("td => getComputedStyle(td).display") for i in range(cells.count())} == {
            "table-cell"
        }
        tops = {round(cells.nth(i).bounding_box()["y"]) for i in range(cells.count())}
        heights = {round(cells.nth(i).bounding_box()["height"]) for i in range(cells.count())}
        assert len(tops) == 1 and len(heights) == 1, (tops, heights)  # one row, every cell its full height


def test_reset_password_asks_first(page, app, watch):
    make_user(app, "root", admin=True)
    make_user(app, "alice")
    sign_in(page, "root")
    page.goto("/admin/users")
    row = page.locator("#users tbody tr", has_text="alice")
    row.get_by_role("button", name="Reset password").click()  # the first time: "no" (watch dismisses)
    expect(page.locator("#users")).to_be_visible()
    expect(page.locator("#password-reset")).to_have_count(0)
    watch.accept_dialogs = True
    row.get_by_role("button", name="Reset password").click()  # then "yes"
    expect(page.locator("#password-reset")).to_contain_text("New password for alice")
    assert len(watch.dialogs) == 2 and all("Give alice a new password?" in d for d in watch.dialogs)
