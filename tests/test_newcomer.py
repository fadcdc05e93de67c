"""What a newcomer notices (issue 12, points 7 and 8), without a browser: the icon, the focused
prompt, the Users page's ids and buttons, gunicorn's control socket, the CLI's help and the
401's advice. tests/test_api_docs.py has the interactive API docs, tests/test_browser_newcomer.py
what needs Chromium."""

from __future__ import annotations

import re
import signal

from tests.helpers import Tags, csrf_from, error_of, login, make_user, start_gunicorn, wait_for
from webapp.services import accounts


def test_the_favicon_is_a_real_icon_at_the_address_browsers_ask(client):
    response = client.get("/favicon.ico")
    assert response.status_code == 200
    assert response.mimetype in ("image/vnd.microsoft.icon", "image/x-icon")
    assert response.data[:4] == b"\x00\x00\x01\x00" and response.data[4] >= 1  # an ICO file with images
    links = [attrs for attrs in Tags(client.get("/login").text).all("link") if attrs.get("rel") == "icon"]
    assert [link["href"] for link in links] == ["/favicon.ico"]


def test_the_prompt_box_has_the_focus_unless_another_field_needs_it(app, client):
    make_user(app)
    login(client)
    home = Tags(client.get("/").text)
    assert [t["id"] for t in home.all("textarea") if "autofocus" in t] == ["prompt"]
    token = csrf_from(client.get("/").text)
    wrong = Tags(client.post("/tasks", data={"prompt": "hi", "priority": "eleven", "csrf_token": token}).text)
    assert not [t for t in wrong.all("textarea") if "autofocus" in t]  # the priority's message has it
    empty = Tags(client.post("/tasks", data={"prompt": " ", "csrf_token": token}).text)
    assert [t["id"] for t in empty.all("textarea") if "autofocus" in t] == ["prompt"]


def admin_client(app, client):
    make_user(app, "root", admin=True)
    make_user(app, "alice")
    login(client, "root")
    return client


def test_the_users_page_has_one_new_password_id_even_after_a_reset(app, client):
    admin_client(app, client)
    page = client.get("/admin/users").text
    target = re.search(r'action="/admin/users/(\d+)/password"', page).group(1)
    reset = client.post(f"/admin/users/{target}/password", data={"csrf_token": csrf_from(page)}).text
    for html in (page, reset):
        ids = [attrs["id"] for _, attrs in Tags(html).tags if "id" in attrs]
        assert ids.count("new-password") == 1 and len(ids) == len(set(ids)), sorted(ids)
    assert 'id="password-reset"' in reset


def test_admin_forms_use_the_buttons_of_the_rest(app, client):
    """Every button on the admin pages is one of the site's kinds (no browser-default button)."""
    admin_client(app, client)
    token = csrf_from(client.get("/admin/tasks").text)
    confirm = client.post("/admin/tasks/preview", data={"action": "delete", "status": "", "csrf_token": token}).text
    kinds = {"primary", "secondary", "danger", "link"}
    for html in (client.get("/admin").text, client.get("/admin/users").text, client.get("/admin/tasks").text, confirm):
        buttons = Tags(html).all("button")
        assert buttons and all(kinds & set(b.get("class", "").split()) for b in buttons), buttons


def test_gunicorn_keeps_its_control_socket_under_instance(test_env, tmp_path):
    """Two copies of the app on one machine no longer share ~/.gunicorn/gunicorn.ctl."""
    instance, home = tmp_path / "instance", tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in test_env.items() if k != "XDG_RUNTIME_DIR"}
    env.update(INSTANCE_PATH=str(instance), HOME=str(home))
    server, _ = start_gunicorn(env, tmp_path / "gunicorn.log")
    try:
        wait_for((instance / "gunicorn.ctl").is_socket, timeout=30)  # made once the workers are up
        assert not (home / ".gunicorn").exists()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def test_tokens_create_says_name_is_the_user_and_takes_a_label(app, runner):
    help_text = runner.invoke(args=["tokens", "create", "--help"]).output
    assert "the user named NAME" in help_text and "--label" in help_text
    make_user(app, "gus")
    result = runner.invoke(args=["tokens", "create", "gus", "--label", "nightly report"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        assert [token.name for token in accounts.list_tokens(accounts.find_user("gus"))] == ["nightly report"]


def test_the_401_points_to_the_tokens_page_and_the_cli(client):
    message = error_of(client.get("/api/v1/tasks"))["message"]
    assert "Tokens page (/tokens)" in message and "flask --app wsgi tokens create" in message
