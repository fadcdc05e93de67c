"""The Batches pages in Chromium: a CSV upload runs live, its errors show by row, results download; Cancel.

SCREENSHOT_DIR=docs .venv/bin/pytest tests/test_browser_batches.py -k csv   # refresh docs/batch-csv.png
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from tests import browser as parts
from tests.browser import expect, needs_chromium, sign_in
from tests.helpers import make_user

pytestmark = needs_chromium
browser, page, server, watch, worker = parts.browser, parts.page, parts.server, parts.watch, parts.worker

CSV = (
    "custom_id,prompt,model,max_tokens\n"
    "capital,What is the capital of France?,,\n"
    "colour,Name a colour of the sky,,3\n"
    "oops,Which model am I?,no-such-model,\n"
)


def test_a_csv_upload_runs_live_and_its_results_download_as_csv(app, page, tmp_path):
    make_user(app, "alice")
    sign_in(page)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Batches").click()
    expect(page.get_by_role("heading", name="Batches", exact=True)).to_be_visible()
    page.get_by_label("File (CSV or JSONL)").set_input_files(
        files=[{"name": "questions.csv", "mimeType": "text/csv", "buffer": CSV.encode()}]
    )
    page.get_by_label("Model").select_option("fake")
    page.get_by_role("button", name="Upload and run").click()

    expect(page.get_by_role("heading", level=1)).to_contain_text("Batch batch_")
    live = page.locator(".batch-live")
    expect(live.locator("[data-batch-status]")).to_have_text("completed", timeout=30_000)
    expect(live.locator("[data-completed]")).to_have_text("2")
    expect(live.locator("[data-failed]")).to_have_text("1")
    assert live.get_attribute("hx-get") is None  # polling stopped with the batch
    errors = page.locator("table.batch-errors tbody tr")
    expect(errors).to_have_count(1)
    expect(errors.first).to_contain_text("3")  # the third row after the header
    expect(errors.first).to_contain_text("model_not_found")

    with page.expect_download() as download:
        page.get_by_role("link", name="answers (CSV)").click()
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert [(row["custom_id"], row["answer"]) for row in rows] == [
        ("capital", "Echo: What is the capital of France?"),
        ("colour", "Echo: Name a "),  # cut at max_tokens 3, a word (and its space) a token
    ]
    with page.expect_download() as download:
        page.get_by_role("link", name="errors (JSONL)").click()
    (error,) = [json.loads(line) for line in Path(download.value.path()).read_text().splitlines()]
    assert error["custom_id"] == "oops" and error["error"]["code"] == "model_not_found"

    page.get_by_role("link", name="Its tasks in History").click()
    expect(page.locator("table.history tbody tr")).to_have_count(2)
    folder = os.environ.get("SCREENSHOT_DIR")
    page.goto("/batches")
    expect(page.locator("table.batches tbody tr")).to_have_count(1)
    expect(page.locator("table.batches [data-counts]")).to_contain_text("2 done, 1 failed, of 3")
    if folder:
        page.goto(page.locator("table.batches a.mono").first.get_attribute("href"))
        page.screenshot(path=str(Path(folder) / "batch-csv.png"), full_page=True)


def test_a_running_batch_is_cancelled_from_its_page(app, page):
    make_user(app, "alice")
    sign_in(page)
    slow = '#fake {"chunks": 6, "delay": 0.5}\nslow'
    lines = "".join(
        json.dumps(
            {
                "custom_id": f"slow-{n}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "fake-narrow", "messages": [{"role": "user", "content": slow}]},
            }
        )
        + "\n"
        for n in range(6)
    )
    page.goto("/batches")
    page.get_by_label("File (CSV or JSONL)").set_input_files(
        files=[{"name": "slow.jsonl", "mimeType": "application/jsonl", "buffer": lines.encode()}]
    )
    page.get_by_role("button", name="Upload and run").click()
    live = page.locator(".batch-live")
    expect(live.locator("[data-batch-status]")).to_have_text("in progress", timeout=30_000)
    page.get_by_role("button", name="Cancel batch").click()
    expect(page.get_by_text("Batch cancelled")).to_be_visible()
    expect(live.locator("[data-batch-status]")).to_have_text("cancelled", timeout=15_000)
    expect(page.locator("table.batch-errors")).to_contain_text("batch_cancelled")


def test_a_file_that_is_not_a_batch_is_refused_on_the_form(app, page):
    make_user(app, "alice")
    sign_in(page)
    page.goto("/batches")
    page.get_by_role("button", name="Upload and run").click()
    expect(page.get_by_role("alert")).to_contain_text("Choose a JSONL or CSV file")
    page.get_by_label("File (CSV or JSONL)").set_input_files(
        files=[{"name": "notes.csv", "mimeType": "text/csv", "buffer": b"question,answer\nwhy,because\n"}]
    )
    page.get_by_role("button", name="Upload and run").click()
    expect(page.get_by_role("alert")).to_contain_text("needs a header row with a 'prompt' column")
    page.get_by_label("File (CSV or JSONL)").set_input_files(
        files=[{"name": "data.jsonl", "mimeType": "application/jsonl", "buffer": b"not json\n"}]
    )
    page.get_by_role("button", name="Upload and run").click()
    expect(page.get_by_role("alert")).to_contain_text("not JSONL")
    expect(page.get_by_text("No batches yet.")).to_be_visible()
