"""Honest limits: prompts that cannot fit are refused, cut answers say so, permanent failures say what to change."""

from __future__ import annotations

import re

from tests.helpers import csrf_from, error_of, login, make_user, task_row, work
from webapp.catalog import LOCAL, LOCAL_CONTEXT_WINDOW
from webapp.rendering import render_markdown

LONG_PROMPT = "Summarise this. " * 2000  # 32,000 characters


def test_local_model_states_its_context_window(api):
    models = {item["name"]: item for item in api.get("/models").get_json()["items"]}
    assert models[LOCAL]["context_window"] == LOCAL_CONTEXT_WINDOW == 4096
    assert models["fake"]["context_window"] is None  # unknown: nothing refused for size


def test_a_prompt_that_cannot_fit_the_context_is_refused_at_submit(app, api):
    assert len(LONG_PROMPT) == 32_000
    response = api.post("/tasks", json={"prompt": LONG_PROMPT, "model": LOCAL})
    assert response.status_code == 422
    error = error_of(response)
    message = error["details"]["prompt"]
    assert "4,096 tokens" in message and "local" in message
    assert "about 10,675 tokens (estimated)" in message, message
    assert "256" in message  # the answer's share: the default max tokens
    with app.app_context():
        from webapp.extensions import db
        from webapp.models import Task

        assert db.session.query(Task).count() == 0  # nothing half-written


def test_the_context_counts_max_tokens_and_the_system_prompt(api):
    prompt = "x" * 10_500  # ~3,508 tokens: fits with 256 to answer
    assert api.post("/tasks", json={"prompt": prompt, "model": LOCAL}).status_code == 202
    too_much = api.post("/tasks", json={"prompt": prompt, "model": LOCAL, "params": {"max_tokens": 1024}})
    assert too_much.status_code == 422
    assert "Shorten the prompt to about 9,192 characters" in error_of(too_much)["details"]["prompt"]
    with_system = api.post("/tasks", json={"prompt": prompt, "model": LOCAL, "params": {"system": "s" * 2000}})
    assert with_system.status_code == 422


def test_the_form_refuses_it_too_and_keeps_the_prompt(app, client):
    make_user(app)
    login(client)
    token = csrf_from(client.get("/").get_data(as_text=True))
    page = client.post("/tasks", data={"prompt": LONG_PROMPT, "model": LOCAL, "csrf_token": token})
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert 'id="prompt-error"' in html and "context window of 4,096 tokens" in html
    assert "Summarise this. Summarise this." in html


def test_an_answer_cut_at_max_tokens_says_so(app, api, client):
    done = api.submit("one two three four five six seven eight", model="fake", params={"max_tokens": 3})
    whole = api.submit("one two", model="fake")
    work(app)
    cut = api.task(done["id"])
    assert cut["status"] == "COMPLETED" and cut["finish_reason"] == "length"
    assert api.task(whole["id"])["finish_reason"] == "stop"

    login(client)
    html = client.get(f"/tasks/{done['id']}").get_data(as_text=True)
    assert "Cut off at 3 tokens: raise max tokens and resubmit." in html
    assert f'href="/?from={done["id"]}"' in html
    assert "Cut off" not in client.get(f"/tasks/{whole['id']}").get_data(as_text=True)

    form = client.get(f"/?from={done['id']}").get_data(as_text=True)
    assert f"Editing task {done['id']}" in form
    assert "one two three four five six seven eight</textarea>" in form
    assert re.search(r'id="max_tokens" name="max_tokens" inputmode="numeric" value="6"', form), "raised to 6"


def test_a_cut_at_the_models_cap_says_to_ask_for_less(app, api, client):
    done = api.submit(" ".join(f"w{i}" for i in range(40)), model="fake-small", params={"max_tokens": 16})
    work(app)
    assert api.task(done["id"])["finish_reason"] == "length"
    login(client)
    html = client.get(f"/tasks/{done['id']}").get_data(as_text=True)
    assert "Cut off at 16 tokens, the most fake-small writes" in html


def test_a_permanent_failure_offers_edit_not_retry(app, api, client, fake_provider):
    prompt = "too long for the provider"
    fake_provider.script(
        prompt, {"status": 400, "message": "the request exceeds the available context size, try increasing it"}
    )
    task = api.submit(prompt, model="fake")
    work(app)
    row = task_row(app, task["id"])
    assert row.status == "FAILED" and row.error_kind == "context_length" and row.attempts == 1
    assert "Shorten the prompt or lower max tokens" in row.error
    login(client)
    html = client.get(f"/tasks/{task['id']}").get_data(as_text=True)
    assert f'id="task-{task["id"]}-retry"' not in html
    assert "Running it again would fail the same way" in html
    assert f'href="/?from={task["id"]}"' in html
    form = client.get(f"/?from={task['id']}").get_data(as_text=True)
    assert "It failed: The prompt and max tokens do not fit" in form
    # The API keeps DESIGN's contract: a FAILED task may be retried (202), whatever the cause.
    assert api.post(f"/tasks/{task['id']}/retry").status_code == 202


def test_a_rejected_request_offers_edit_and_a_transient_failure_offers_retry(app, api, client, fake_provider):
    fake_provider.script("bad request", {"status": 400, "message": "unsupported value"})
    fake_provider.script("flaky", *[{"status": 500}] * 5)
    rejected = api.submit("bad request", model="fake")
    flaky = api.submit("flaky", model="fake")
    work(app)
    assert task_row(app, rejected["id"]).error_kind == "invalid_request"
    assert task_row(app, flaky["id"]).status == "FAILED"
    login(client)
    rejected_html = client.get(f"/tasks/{rejected['id']}").get_data(as_text=True)
    assert f'id="task-{rejected["id"]}-retry"' not in rejected_html
    assert f'id="task-{rejected["id"]}-edit"' in rejected_html
    flaky_html = client.get(f"/tasks/{flaky['id']}").get_data(as_text=True)
    assert f'id="task-{flaky["id"]}-retry"' in flaky_html
    assert f'id="task-{flaky["id"]}-edit"' not in flaky_html


def test_the_edit_link_only_opens_your_own_tasks(app, api, client):
    theirs = api.submit("alice's prompt", model="fake")
    make_user(app, "bob")
    login(client, "bob")
    for source in (str(theirs["id"]), "abc", "0", "-1", str(2**63), "9" * 30):
        response = client.get(f"/?from={source}")
        assert response.status_code == 404, source
        assert "alice's prompt" not in response.get_data(as_text=True)


def test_single_newlines_are_line_breaks_and_html_stays_out():
    haiku = "An old silent pond\nA frog jumps into the pond\nSplash! Silence again."
    html = str(render_markdown(haiku))
    assert html.count("<br>") == 2 and "<p>" in html
    assert "<script" not in str(render_markdown("line one\n<script>alert(1)</script>"))
