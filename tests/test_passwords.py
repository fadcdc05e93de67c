"""Weak passwords are refused on every path that sets one: the admin's form, the account page
(tests/test_sessions.py), `users create` and `users set-password`, with advice on what to do."""

from __future__ import annotations

import pytest

from tests.helpers import csrf_from, login, make_user
from webapp.errors import ValidationError
from webapp.services import accounts

WEAK = ["aaaaaaaa", " " * 8, "\t \t \t \t", "password123", "alice2024!", "qwertyuiop", "12345678"]


@pytest.mark.parametrize("password", WEAK)
def test_the_service_refuses_weak_and_blank_passwords(ctx, password):
    with pytest.raises(ValidationError) as refused:
        accounts.create_user("alice", password)
    assert "Add another word or two" in refused.value.message or "only spaces" in refused.value.message
    assert refused.value.details == {"password": refused.value.details["password"]}


def test_a_password_like_the_username_is_weak(ctx):
    with pytest.raises(ValidationError):
        accounts.create_user("margarethe", "margarethe1")


def test_strong_passwords_pass(ctx):
    for n, password in enumerate(
        ("correct horse battery", "plum lantern orbit", "Tr0ub4dor&3-x", "x" * 3 + "7#Qm!zP0")
    ):
        accounts.create_user(f"user{n}", password)


def test_users_create_refuses_a_weak_password(runner):
    for weak in ("aaaaaaaa", "        "):
        result = runner.invoke(args=["users", "create", "erin", "--password-stdin"], input=f"{weak}\n")
        assert result.exit_code != 0 and ("Add another word or two" in result.output or "only spaces" in result.output)
    assert (
        runner.invoke(args=["users", "create", "erin", "--password-stdin"], input="plum lantern orbit\n").exit_code == 0
    )


def test_the_admin_form_refuses_a_weak_password(app, client):
    make_user(app, "root", admin=True)
    login(client, "root")
    token = csrf_from(client.get("/admin/users").text)
    response = client.post("/admin/users", data={"csrf_token": token, "username": "fay", "password": "aaaaaaaa"})
    assert response.status_code == 200
    assert "too easy to guess" in response.text and "Add another word or two" in response.text
    assert "fay" not in [user.username for user in _users(app)]


def _users(app):
    from webapp.extensions import db
    from webapp.models import User

    with app.app_context():
        return list(db.session.query(User))
