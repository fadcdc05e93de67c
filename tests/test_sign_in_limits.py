"""Failed sign-ins: the strict limit counts one account from one address, so a stranger's
failures elsewhere cannot lock the owner out; a looser limit counts the account everywhere."""

from __future__ import annotations

import pytest

from tests.helpers import PASSWORD, csrf_from, make_user


@pytest.fixture
def limits_on(app, monkeypatch):
    """The limits as configured by default, on for this test (the suite runs with them off)."""
    monkeypatch.setitem(app.config, "RATELIMIT_ENABLED", True)


def browser_at(app, address: str):
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return client


def attempt(client, username: str, password: str):
    token = csrf_from(client.get("/login").text)
    return client.post("/login", data={"username": username, "password": password, "csrf_token": token})


def test_a_strangers_failures_from_another_address_do_not_lock_the_owner_out(app, limits_on):
    make_user(app, "admin", admin=True)
    attacker = browser_at(app, "203.0.113.9")
    statuses = [attempt(attacker, "admin", f"guess {n}").status_code for n in range(20)]  # 20 in a minute
    assert statuses[:5] == [200] * 5 and set(statuses[5:]) == {429}  # the attacker waits...
    owner = browser_at(app, "198.51.100.7")
    assert attempt(owner, "admin", PASSWORD).status_code == 302  # ...the owner does not


def test_many_addresses_against_one_account_meet_the_looser_limit(app, limits_on, monkeypatch):
    monkeypatch.setitem(app.config, "LOGIN_LIMIT_PER_ACCOUNT", "12/minute")
    make_user(app)
    for n in range(4):  # four addresses, three failures each: none reaches its own limit of 5
        for _ in range(3):
            assert attempt(browser_at(app, f"192.0.2.{n}"), "alice", "guess").status_code == 200
    response = attempt(browser_at(app, "198.51.100.7"), "alice", PASSWORD)
    assert response.status_code == 429 and int(response.headers["Retry-After"]) > 0


def test_the_owner_from_the_attacked_address_waits_too(app, limits_on):
    make_user(app)
    shared = browser_at(app, "203.0.113.9")  # say, one office behind one address
    for _ in range(5):
        attempt(shared, "alice", "guess")
    assert attempt(shared, "alice", PASSWORD).status_code == 429
    assert attempt(browser_at(app, "203.0.113.10"), "alice", PASSWORD).status_code == 302
