"""The Webhooks page in Chromium: add an endpoint, test it, see the log, rotate, resend, delete.

Deliveries go to a real receiver on loopback and are verified with `standardwebhooks`.
SCREENSHOT_DIR=/tmp/shots .venv/bin/pytest tests/test_browser_webhooks.py   # keep the screenshots
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import update

from tests import browser as parts
from tests.browser import expect, needs_chromium, sign_in
from tests.helpers import make_user
from tests.receiver import Receiver, deliver_all
from webapp.extensions import db
from webapp.models import utcnow
from webapp.webhook_models import WebhookEndpoint

pytestmark = needs_chromium
browser, page, server, watch, worker = parts.browser, parts.page, parts.server, parts.watch, parts.worker


@pytest.fixture
def receiver(app):
    app.config["WEBHOOK_ALLOW_LOOPBACK"] = True
    server = Receiver().start()
    yield server
    server.stop()
    app.config["WEBHOOK_ALLOW_LOOPBACK"] = False


def shoot(page, name: str) -> None:
    """Screenshot at 1280 px and 390 px wide (SCREENSHOT_DIR keeps them)."""
    folder = os.environ.get("SCREENSHOT_DIR")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    for width in (1280, 390):
        page.set_viewport_size({"width": width, "height": 900})
        page.screenshot(path=f"{folder}/{name}-{width}.png", full_page=True)
    page.set_viewport_size({"width": 1100, "height": 900})


def test_add_test_rotate_resend_and_delete_an_endpoint(app, page, receiver, watch):
    make_user(app)
    sign_in(page)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Webhooks").click()
    expect(page.get_by_role("heading", name="Webhooks", exact=True)).to_be_visible()
    expect(page.get_by_text("No endpoints yet.")).to_be_visible()

    # A refused address: the form says why, and keeps what was typed.
    page.get_by_label("URL of your receiver").fill("http://169.254.169.254/latest/meta-data/")
    page.get_by_role("button", name="Add endpoint").click()
    expect(page.locator("#url-error")).to_contain_text("metadata")
    expect(page.get_by_label("URL of your receiver")).to_have_value("http://169.254.169.254/latest/meta-data/")

    page.get_by_label("URL of your receiver").fill(receiver.url)
    page.get_by_label("Description").fill("CRM sync")
    page.get_by_role("button", name="Add endpoint").click()
    secret = page.get_by_label("Signing secret").input_value()
    assert secret.startswith("whsec_")
    shoot(page, "webhooks-added")

    page.get_by_role("link", name="Send it a test event").click()
    page.get_by_role("button", name="Send a test event").click()
    expect(page.get_by_text("A test event is on its way")).to_be_visible()
    deliver_all(app)
    assert receiver.wait_for(1)[0].verify(secret)["type"] == "webhook.test"
    log = page.locator("table.deliveries")
    expect(log.get_by_text("delivered", exact=True)).to_be_visible()  # the log polls while pending

    # A failed delivery, then Resend.
    receiver.answer(500)
    app.config["WEBHOOK_RETRY_DELAYS"] = ""
    try:
        page.get_by_role("button", name="Send a test event").click()
        deliver_all(app)
        expect(log.get_by_text("failed", exact=True)).to_be_visible()
        expect(log.get_by_text("HTTP 500")).to_be_visible()
        shoot(page, "webhook-log")
        page.get_by_role("button", name="Resend").first.click()
        deliver_all(app)
        expect(log.get_by_text("failed", exact=True)).to_have_count(0)
    finally:
        app.config["WEBHOOK_RETRY_DELAYS"] = "5,300,1800,7200,18000,36000,36000"
    assert len(receiver.wait_for(3)) == 3

    watch.accept_dialogs = True
    page.get_by_role("button", name="Rotate secret").click()
    new_secret = page.get_by_label("New signing secret").input_value()
    assert new_secret.startswith("whsec_") and new_secret != secret

    page.goto("/webhooks")
    row = page.locator("table.webhooks tbody tr")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("delivered")
    expect(row).to_contain_text("CRM sync")
    shoot(page, "webhooks-list")

    row.get_by_role("link").click()
    page.get_by_role("button", name="Delete").click()
    expect(page.get_by_text("No endpoints yet.")).to_be_visible()


def test_a_disabled_endpoint_shows_why_and_can_be_enabled(app, page, receiver, watch):
    make_user(app)
    sign_in(page)
    page.goto("/webhooks")
    page.get_by_label("URL of your receiver").fill(receiver.url)
    page.get_by_role("button", name="Add endpoint").click()
    with app.app_context():
        db.session.execute(
            update(WebhookEndpoint).values(
                disabled_at=utcnow(), disabled_reason="Every delivery failed for 5 days (since 2026-12-01 10:00 UTC)."
            )
        )
        db.session.commit()
    page.get_by_role("link", name="Send it a test event").click()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("This endpoint is disabled")
    expect(alert).to_contain_text("failed for 5 days")
    expect(page.get_by_role("button", name="Send a test event")).to_be_disabled()
    shoot(page, "webhook-disabled")
    page.get_by_role("button", name="Enable again").click()
    expect(page.get_by_text("The endpoint is enabled again")).to_be_visible()
    expect(page.get_by_role("button", name="Send a test event")).to_be_enabled()
