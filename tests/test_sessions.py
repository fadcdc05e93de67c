"""Sign-ins that end: a saved cookie dies with its sign-in, whoever ends it (the user signing
out, "sign out everywhere", a password change or reset, an admin disabling the account), and the
CSRF token changes whenever who is signed in does."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import event, update

from tests.helpers import PASSWORD, api_client, csrf_from, login, make_user
from webapp.extensions import db
from webapp.models import User, UserSession, utcnow
from webapp.services import accounts, sessions

NEW_PASSWORD = "plum lantern orbit"


def post_form(client, path: str, page: str = "/"):
    token = csrf_from(client.get(page).text)
    return client.post(path, data={"csrf_token": token})


def signed_in(app, username: str = "alice", password: str = PASSWORD):
    client = app.test_client()
    assert login(client, username, password).status_code == 302
    return client


def cookie_of(client) -> str:
    return client.get_cookie("session").value


def with_cookie(app, cookie: str):
    """A new browser holding a copy of a session cookie."""
    client = app.test_client()
    client.set_cookie("session", cookie)
    return client


def is_signed_in(client) -> bool:
    response = client.get("/tasks")
    assert response.status_code in (200, 302), response.status
    return response.status_code == 200


def session_rows(app, user_id: int) -> int:
    with app.app_context():
        return sessions.count(user_id)


def test_signing_out_ends_the_session_for_a_saved_copy_of_the_cookie(app):
    make_user(app)
    client = signed_in(app)
    saved = cookie_of(client)
    assert is_signed_in(with_cookie(app, saved))
    post_form(client, "/logout")
    assert not is_signed_in(client)
    assert not is_signed_in(with_cookie(app, saved))


def test_sign_out_everywhere_from_the_account_page(app):
    alice = make_user(app)
    laptop, phone = signed_in(app), signed_in(app)
    page = laptop.get("/account")
    assert page.status_code == 200 and "in 2 browsers" in page.text
    assert 'href="/account"' in laptop.get("/").text  # linked from the navigation
    response = post_form(laptop, "/account/sign-out-everywhere", page="/account")
    assert response.status_code == 303 and response.headers["Location"] == "/login"
    assert not is_signed_in(laptop) and not is_signed_in(phone)
    assert session_rows(app, alice.id) == 0
    assert "You are signed out everywhere (2 browsers)." in laptop.get("/login").text


def change_password(client, current: str, new: str, confirm: str | None = None):
    token = csrf_from(client.get("/account").text)
    form = {"csrf_token": token, "current_password": current, "password": new, "confirm": confirm or new}
    return client.post("/account/password", data=form)


def test_a_password_change_ends_every_other_session_and_keeps_this_one(app):
    alice = make_user(app)
    laptop, phone = signed_in(app), signed_in(app)
    before = cookie_of(laptop)
    response = change_password(laptop, PASSWORD, NEW_PASSWORD)
    assert response.status_code == 303, response.text
    assert "Your password is changed. 1 other browser is signed out." in laptop.get("/account").text
    assert is_signed_in(laptop)  # under a new sign-in...
    assert not is_signed_in(with_cookie(app, before))  # ...so its old cookie is worthless too
    assert not is_signed_in(phone)
    assert session_rows(app, alice.id) == 1
    assert login(app.test_client(), password=PASSWORD).status_code == 200  # the old password is gone
    assert login(app.test_client(), password=NEW_PASSWORD).status_code == 302


def test_a_password_change_needs_the_current_password_and_a_strong_new_one(app):
    make_user(app)
    client = signed_in(app)
    for current, new, confirm, message in (
        ("wrong guess", NEW_PASSWORD, None, "The current password is not right."),
        (PASSWORD, NEW_PASSWORD, "plum lantern", "The two new passwords are not the same."),
        (PASSWORD, "aaaaaaaa", None, "too easy to guess"),
        (PASSWORD, " " * 12, None, "cannot be only spaces"),
        (PASSWORD, PASSWORD, None, "other than the current one"),
    ):
        response = change_password(client, current, new, confirm)
        assert response.status_code == 200 and message in response.text, (new, response.text)
    assert is_signed_in(client)
    assert login(app.test_client()).status_code == 302  # nothing changed


def admin_form(client, path: str, **fields):
    token = csrf_from(client.get("/admin/users").text)
    return client.post(path, data={"csrf_token": token, **fields})


def test_an_admin_reset_ends_the_users_sessions_and_can_revoke_their_tokens(app):
    make_user(app, "root", admin=True)
    admin = signed_in(app, "root")
    api = api_client(app)  # alice, with a token
    browser = signed_in(app)
    users_page = admin.get("/admin/users").text
    assert 'name="revoke_tokens"' in users_page  # the reset offers to revoke the tokens

    response = admin_form(admin, f"/admin/users/{api.user.id}/password")  # box left unticked
    assert response.status_code == 200 and "1 sign-in ended." in response.text
    assert response.headers["Cache-Control"] == "no-store"
    assert not is_signed_in(browser)
    assert api.get("/tasks").status_code == 200  # tokens kept, as asked

    browser = signed_in(app, password=response.text.split("<code>")[1].split("</code>")[0])
    response = admin_form(admin, f"/admin/users/{api.user.id}/password", revoke_tokens="on")
    assert "1 sign-in ended, 1 API token revoked." in response.text
    assert not is_signed_in(browser)
    assert api.get("/tasks").status_code == 401


def test_an_admin_resetting_their_own_password_stays_signed_in(app):
    root = make_user(app, "root", admin=True)
    admin, other_browser = signed_in(app, "root"), signed_in(app, "root")
    response = admin_form(admin, f"/admin/users/{root.id}/password")
    assert "2 sign-ins ended." in response.text
    assert admin.get("/admin/users").status_code == 200
    assert not is_signed_in(other_browser)


def test_disabling_ends_sessions_for_good(app):
    make_user(app, "root", admin=True)
    admin = signed_in(app, "root")
    alice = make_user(app)
    browser = signed_in(app)
    saved = cookie_of(browser)
    admin_form(admin, f"/admin/users/{alice.id}/active", active="0")
    assert not is_signed_in(browser)
    admin_form(admin, f"/admin/users/{alice.id}/active", active="1")
    assert not is_signed_in(with_cookie(app, saved))  # re-enabling revives no old cookie
    assert is_signed_in(signed_in(app))  # she signs in again


def test_users_set_password_from_the_command_line_ends_sessions(app, runner):
    make_user(app)
    browser = signed_in(app)
    weak = runner.invoke(args=["users", "set-password", "alice", "--password-stdin"], input="aaaaaaaa\n")
    assert weak.exit_code != 0 and "Add another word or two" in weak.output
    assert is_signed_in(browser)
    result = runner.invoke(args=["users", "set-password", "ALICE", "--password-stdin"], input=f"{NEW_PASSWORD}\n")
    assert result.exit_code == 0, result.output
    assert "Password set for alice; 1 sign-in ended." in result.output
    assert not is_signed_in(browser)
    assert login(app.test_client(), password=NEW_PASSWORD).status_code == 302
    unknown = runner.invoke(args=["users", "set-password", "nobody", "--password-stdin"], input=f"{NEW_PASSWORD}\n")
    assert unknown.exit_code != 0 and "No user named 'nobody'" in unknown.output


def test_a_session_idle_too_long_ends_and_is_purged(app):
    alice = make_user(app)
    browser = signed_in(app)
    with app.app_context():
        old = utcnow() - timedelta(days=app.config["SESSION_IDLE_DAYS"], minutes=1)
        db.session.execute(update(UserSession).values(last_seen_at=old))
        db.session.commit()
    assert not is_signed_in(browser)
    with app.app_context():
        assert sessions.purge_idle() == 1
    assert session_rows(app, alice.id) == 0


def test_loading_the_signed_in_user_is_one_query(app):
    make_user(app)
    with app.app_context():
        user = accounts.find_user("alice")
        key = sessions.start(user)
        db.session.remove()
        statements = []
        listener = lambda *args: statements.append(args[2])  # noqa: E731 (the statement text)
        event.listen(db.engine, "before_cursor_execute", listener)
        try:
            loaded = sessions.user_for(key)
        finally:
            event.remove(db.engine, "before_cursor_execute", listener)
        assert isinstance(loaded, User) and loaded.username == "alice"
        assert len(statements) == 1, statements
        assert sessions.user_for(key + "x") is None and sessions.user_for("") is None


def test_the_csrf_token_changes_at_sign_in_and_sign_out(app):
    make_user(app)
    client = app.test_client()
    anonymous_token = csrf_from(client.get("/login").text)
    client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": anonymous_token})
    signed_in_token = csrf_from(client.get("/tokens").text)
    assert signed_in_token != anonymous_token
    # The token read from the anonymous page no longer works once signed in.
    refused = client.post("/tokens", data={"name": "with the old token", "csrf_token": anonymous_token})
    assert refused.status_code == 400
    client.post("/logout", data={"csrf_token": signed_in_token})
    after = csrf_from(client.get("/login").text)
    assert after not in (signed_in_token, anonymous_token)
    stale = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": signed_in_token})
    assert stale.status_code == 400
