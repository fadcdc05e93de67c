"""Hostile prompts, system prompts, answers and provider errors stay text on every page that shows them.

Server-side: each payload of tests/payloads.py is rendered on the task page (finished, streaming
and failed), its live partial, its History row, History (also as the search and model filter),
and the admin pages, and each page's markup is compared with the same page showing harmless
text. tests/test_browser_security.py shows the same pages to a real browser.
"""

from __future__ import annotations

from tests.helpers import api_client, csrf_from, login, make_user, work
from tests.payloads import PAYLOADS, inert_problems, signatures
from tests.tally import counts
from webapp.extensions import db
from webapp.models import Task


def seed(api, fake_provider, text: str) -> dict[str, int]:
    """Three tasks to show `text`: completed (as prompt, system prompt and answer), failed (as the
    provider's message) and one to be running (as the text so far, see `run`)."""
    fake_provider.script(text, {"chunks": [text]})
    fake_provider.script(text + " (fails)", {"status": 400, "message": text})
    done = api.submit(text, params={"system": text})
    failed = api.submit(text + " (fails)")
    running = api.submit(text + " (running)")
    return {"done": done["id"], "failed": failed["id"], "running": running["id"], "text": text}


def run(app, seeded: list[dict]) -> None:
    """Run every task, then put the third of each back to running with the text as its answer so far."""
    work(app)
    with app.app_context():
        for ids in seeded:
            row = db.session.get(Task, ids["running"])
            row.status, row.result, row.progress = "PROCESSING", ids["text"], 40
        db.session.commit()
        db.session.remove()


def pages(user, admin, ids: dict[str, int], text: str) -> dict[str, str]:
    """Every page that shows the text, by a name that is the same for every text."""
    get = lambda client, path, **kw: client.get(path, **kw).get_data(as_text=True)  # noqa: E731
    shown = {
        "task": get(user, f"/tasks/{ids['done']}"),
        "task live": get(user, f"/tasks/{ids['done']}/live"),
        "task row": get(user, f"/tasks/{ids['done']}/row"),
        "failed task": get(user, f"/tasks/{ids['failed']}"),
        "running task": get(user, f"/tasks/{ids['running']}"),
        "running live": get(user, f"/tasks/{ids['running']}/live?seen=PENDING"),
        "running row": get(user, f"/tasks/{ids['running']}/row"),
        "history": get(user, "/tasks"),
        "history search": get(user, "/tasks", query_string={"q": text[:200]}),
        "history model": get(user, "/tasks", query_string={"model": text[:100]}),
        "history htmx": get(user, "/tasks", query_string={"q": text[:200]}, headers={"HX-Request": "true"}),
        "admin stats": get(admin, "/admin"),
        "admin users": get(admin, "/admin/users"),
    }
    token = csrf_from(get(admin, "/admin/tasks"))
    preview = {"action": "cancel", "model": text[:100], "csrf_token": token}
    shown["admin preview"] = admin.post("/admin/tasks/preview", data=preview).get_data(as_text=True)
    return shown


def test_hostile_text_stays_text_on_every_page(app, fake_provider, monkeypatch):
    monkeypatch.setitem(app.config, "HISTORY_PAGE_SIZE", 1000)  # one History page, as in the baseline
    api = api_client(app)
    make_user(app, "root", admin=True)
    user, admin = app.test_client(), app.test_client()
    login(user)
    login(admin, "root")

    benign = seed(api, fake_provider, "hello")
    seeded = [seed(api, fake_provider, payload) for payload in PAYLOADS]
    run(app, [benign, *seeded])
    baseline = {name: signatures(html) for name, html in pages(user, admin, benign, "hello").items()}
    problems = []
    for ids in seeded:
        payload = ids["text"]
        for name, html in pages(user, admin, ids, payload).items():
            counts["payload renders checked (server)"] += 1
            problems += [f"{name} with {payload!r}: {p}" for p in inert_problems(html, baseline[name])]
            assert "Traceback" not in html
        if "{{ 7*7 }}" in payload:
            # Shown as typed: nothing evaluated it, and no secret came out.
            task_page = user.get(f"/tasks/{ids['done']}").get_data(as_text=True)
            assert "{{ 7*7 }} {{ config.SECRET_KEY }}" in task_page and app.config["SECRET_KEY"] not in task_page
    assert not problems, "\n".join(problems)
