"""Fallbacks: a task whose model is unavailable moves on to the next model of its chain.

Two real HTTP providers (tests/fake_provider.py): `first` is served by one, `second` by the
other, and `first` falls back to `second`. Each test makes `first` unavailable in one way
(retryable errors that use up its attempts, an open circuit breaker, a long Retry-After, a
prompt too long for it, a port nobody listens on) or fails it for good (a 400 that is not about
the context, a refused key), and reads what the task, its attempt history and its page say.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from jobs.breaker import Breaker
from tests.fake_provider import FakeProvider
from tests.helpers import api_client, free_port, login, scrape, signed_in, work
from tests.priced import OVERRIDES
from webapp import create_app
from webapp.extensions import db
from webapp.models import TaskAttempt

PROMPT = "Name three rivers"


@pytest.fixture(scope="module")
def second_provider():
    provider = FakeProvider().start()
    yield provider
    provider.stop()


def chain_models(first_url: str, second_url: str) -> dict[str, dict]:
    base = {"max_tokens": 1024, "default_max_tokens": 64, "timeout": 10, "read_timeout": 2}
    return {
        "first": {**base, "base_url": first_url, "upstream": "first", "fallbacks": ["second"]},
        "second": {
            **base,
            "base_url": second_url,
            "upstream": "second",
            "usd_per_million_input_tokens": "3",
            "usd_per_million_output_tokens": "15",
        },
        # Three deep: head → first → second.
        "head": {**base, "base_url": first_url, "upstream": "head", "fallbacks": ["first"]},
        # 80 tokens of context: a prompt of 300 characters (108 tokens by the estimate) does not fit.
        "narrow": {**base, "base_url": first_url, "upstream": "narrow", "context_window": 80, "fallbacks": ["second"]},
        # A provider nobody answers for (connection refused).
        "dead": {**base, "base_url": f"http://127.0.0.1:{free_port()}/v1", "upstream": "dead", "fallbacks": ["second"]},
    }


@pytest.fixture
def chain_app(app, fake_provider, second_provider):
    overrides = {name: app.config[name] for name in OVERRIDES}
    models = chain_models(fake_provider.url, second_provider.url)
    chained = create_app({**overrides, "MODELS_FILE": None, "DEFAULT_MODEL": "first", "MODELS": models})
    yield chained
    second_provider.reset()
    with chained.app_context():
        db.session.remove()
        db.engine.dispose()


def run(chain_app, model: str = "first", prompt: str = PROMPT) -> tuple[dict, object]:
    api = api_client(chain_app)
    submitted = api.submit(prompt, model=model)
    work(chain_app)
    return api.task(submitted["id"]), api


def history(chain_app, task_id: int) -> list[tuple[str, str, str, bool]]:
    with chain_app.app_context():
        rows = db.session.scalars(db.select(TaskAttempt).where(TaskAttempt.task_id == task_id).order_by(TaskAttempt.id))
        found = [(row.model, row.kind, row.detail, row.fell_back) for row in rows]
        db.session.remove()
    return found


def page_story(chain_app, task_id: int) -> str:
    client = chain_app.test_client()
    login(client)
    html = client.get(f"/tasks/{task_id}").get_data(as_text=True)
    marker = f'id="task-{task_id}-fallbacks">'
    assert marker in html, html
    return html.split(marker, 1)[1].split("</p>", 1)[0]


def test_retryable_errors_use_up_the_models_share_then_the_next_model_answers(
    chain_app, fake_provider, second_provider
):
    fake_provider.script(PROMPT, *[{"status": 500}] * 3)
    task, _ = run(chain_app)
    assert task["status"] == "COMPLETED" and task["error"] is None
    assert task["model"] == "first" and task["served_by"] == "second"
    assert task["result"] == f"Echo: {PROMPT}"
    assert len(fake_provider.calls_for(PROMPT)) == 3 and len(second_provider.calls_for(PROMPT)) == 1
    assert second_provider.calls_for(PROMPT)[0].model == "second"
    # Priced at the model that answered: 3 prompt words, 4 answer pieces at $3 / $15 per million.
    usage = task["usage"]
    expected = (Decimal(usage["prompt_tokens"]) * 3 + Decimal(usage["completion_tokens"]) * 15) / 10**6
    assert Decimal(str(task["cost_usd"])) == expected
    assert history(chain_app, task["id"]) == [
        ("first", "provider_error", "HTTP 500", False),
        ("first", "provider_error", "HTTP 500", False),
        ("first", "provider_error", "HTTP 500", True),
    ]
    assert page_story(chain_app, task["id"]) == "Fell back: first → second after 3 × HTTP 500."
    # Prometheus: the move, and the dollars at the prices of the model that answered.
    client = chain_app.test_client()
    signed_in(chain_app, client, "admin")
    m = scrape(client)
    assert m[("atr_task_fallbacks_total", (("kind", "provider_error"), ("model", "first"), ("to", "second")))] == 1
    assert Decimal(str(m[("atr_cost_usd_total", (("model", "second"),))])) == expected
    assert ("atr_tasks_failed_total", (("kind", "provider_error"), ("model", "first"))) not in m


def test_an_open_breaker_moves_the_task_on_without_calling_the_model(chain_app, fake_provider, second_provider):
    with chain_app.app_context():
        breaker = Breaker("first")
        for _ in range(chain_app.config["BREAKER_FAILURES"]):
            breaker.failure()
        assert not breaker.check().allowed
    task, _ = run(chain_app)
    assert task["status"] == "COMPLETED" and task["served_by"] == "second" and task["error"] is None
    assert fake_provider.calls_for(PROMPT) == [] and len(second_provider.calls_for(PROMPT)) == 1
    assert task["attempts"] == 1  # moving on from an open breaker spends no attempt
    assert history(chain_app, task["id"]) == [("first", "circuit_open", "circuit open", True)]
    assert page_story(chain_app, task["id"]) == "Fell back: first → second after circuit open."


def test_a_retry_after_longer_than_the_task_waits_moves_it_on_at_once(chain_app, fake_provider, second_provider):
    fake_provider.script(PROMPT, {"status": 429, "retry_after": 600})
    task, _ = run(chain_app)
    assert task["status"] == "COMPLETED" and task["served_by"] == "second"
    assert len(fake_provider.calls_for(PROMPT)) == 1 and len(second_provider.calls_for(PROMPT)) == 1
    assert page_story(chain_app, task["id"]) == "Fell back: first → second after HTTP 429, asked to wait 600 s."


@pytest.mark.parametrize(
    "message",
    [
        "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens.",
        "the request exceeds the available context size, try increasing it",
    ],
)
def test_a_prompt_too_long_for_the_model_moves_it_on(chain_app, fake_provider, second_provider, message):
    fake_provider.script(PROMPT, {"status": 400, "message": message})
    task, _ = run(chain_app)
    assert task["status"] == "COMPLETED" and task["served_by"] == "second"
    assert len(fake_provider.calls_for(PROMPT)) == 1
    assert history(chain_app, task["id"]) == [("first", "context_length", "prompt too long", True)]
    assert page_story(chain_app, task["id"]) == "Fell back: first → second after prompt too long."


def test_a_provider_nobody_answers_for_falls_back_after_its_attempts(chain_app, second_provider):
    task, _ = run(chain_app, model="dead")
    assert task["status"] == "COMPLETED" and task["model"] == "dead" and task["served_by"] == "second"
    assert [row[:2] for row in history(chain_app, task["id"])] == [("dead", "connection")] * 3
    assert page_story(chain_app, task["id"]) == "Fell back: dead → second after 3 × connection error."


@pytest.mark.parametrize(
    "step, kind",
    [
        ({"status": 400, "message": "temperature is not supported with this model"}, "invalid_request"),
        ({"status": 401, "message": "Incorrect API key provided"}, "auth"),
    ],
)
def test_permanent_errors_do_not_fall_back(chain_app, fake_provider, second_provider, step, kind):
    fake_provider.script(PROMPT, step)
    task, _ = run(chain_app)
    assert task["status"] == "FAILED" and task["served_by"] is None
    assert f"HTTP {step['status']}" in task["error"]
    assert second_provider.calls_for(PROMPT) == []
    assert history(chain_app, task["id"]) == [("first", kind, f"HTTP {step['status']}", False)]


def test_the_chain_runs_out_then_the_task_fails_and_a_retry_starts_at_its_head(
    chain_app, fake_provider, second_provider
):
    fake_provider.script(PROMPT, *[{"status": 500}] * 3)
    second_provider.script(PROMPT, *[{"status": 503}] * 3)
    task, api = run(chain_app)
    assert task["status"] == "FAILED" and task["attempts"] == 6
    assert "HTTP 503" in task["error"] and "Gave up" in task["error"]
    assert [row[0] for row in history(chain_app, task["id"])] == ["first"] * 3 + ["second"] * 3
    assert page_story(chain_app, task["id"]) == "Fell back: first → second after 3 × HTTP 500."
    # A retry asks the model the user chose first again (the providers answer now).
    assert api.post(f"/tasks/{task['id']}/retry").status_code == 202
    work(chain_app)
    again = api.task(task["id"])
    assert again["status"] == "COMPLETED" and again["served_by"] == "first"


def test_a_chain_of_three_tells_each_hop(chain_app, fake_provider, second_provider):
    with chain_app.app_context():
        breaker = Breaker("head")
        for _ in range(chain_app.config["BREAKER_FAILURES"]):
            breaker.failure()
    fake_provider.script(PROMPT, *[{"status": 502}] * 3)
    task, _ = run(chain_app, model="head")
    assert task["status"] == "COMPLETED" and task["model"] == "head" and task["served_by"] == "second"
    assert page_story(chain_app, task["id"]) == (
        "Fell back: head → first after circuit open; then first → second after 3 × HTTP 502."
    )


def test_a_prompt_that_does_not_fit_the_context_window_moves_on_before_any_call(
    chain_app, fake_provider, second_provider
):
    long_prompt = "x" * 300
    task, api = run(chain_app, model="narrow", prompt=long_prompt)
    assert task["status"] == "COMPLETED" and task["model"] == "narrow" and task["served_by"] == "second"
    assert fake_provider.calls_for(long_prompt) == [] and len(second_provider.calls_for(long_prompt)) == 1
    assert task["attempts"] == 1  # none spent on the model it could not fit
    assert page_story(chain_app, task["id"]) == "Fell back: narrow → second after prompt too long."
    # A prompt that fits stays on it.
    submitted = api.submit("short", model="narrow")
    work(chain_app)
    short = api.task(submitted["id"])
    assert short["served_by"] == "narrow" and len(fake_provider.calls_for("short")) == 1
