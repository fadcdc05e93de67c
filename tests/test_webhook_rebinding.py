"""DNS rebinding: a delivery resolves the endpoint's name itself, checks every address, and
connects to the address it checked, so a name that moves to an internal address is refused
before any connection.

The name's answers are scripted by replacing `socket.getaddrinfo` (what a resolver under an
attacker's control would return); every address is either the loopback receiver or one refused
before connecting, so no traffic leaves loopback.
"""

from __future__ import annotations

import socket

import pytest
from sqlalchemy import select

from tests.receiver import deliver_all
from webapp.extensions import db
from webapp.lifecycle import attempts
from webapp.webhook_models import WebhookDelivery

NAME = "hooks.rebind.test"


@pytest.fixture
def dns(monkeypatch):
    """Answer NAME with the addresses in `answers` (the last list is repeated); record each lookup."""
    real = socket.getaddrinfo
    state = {"answers": [["127.0.0.1"]], "lookups": 0}

    def getaddrinfo(host, port, *args, **kwargs):
        if host != NAME:
            return real(host, port, *args, **kwargs)
        state["lookups"] += 1
        answers = state["answers"]
        addresses = answers.pop(0) if len(answers) > 1 else answers[0]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return state


def add_endpoint(api, receiver) -> str:
    port = receiver.server.server_address[1]
    response = api.post("/webhooks", json={"url": f"http://{NAME}:{port}/hooks", "events": ["task.completed"]})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["secret"]


def complete(app, api) -> None:
    task = api.submit()
    with app.app_context():
        claim = attempts.claim(task["id"])
        assert attempts.complete(claim, "Paris.", 3, 2, "stop")
        db.session.remove()


def only_delivery(app) -> WebhookDelivery:
    with app.app_context():
        (row,) = db.session.scalars(select(WebhookDelivery))
        db.session.expunge(row)
        return row


def test_a_name_that_moves_to_an_internal_address_is_refused_before_connecting(app, api, hooks, receiver, dns):
    hooks["WEBHOOK_RETRY_DELAYS"] = ""
    dns["answers"] = [["127.0.0.1"], ["10.0.0.7"]]  # loopback at registration, private at delivery
    add_endpoint(api, receiver)
    complete(app, api)
    deliver_all(app)
    row = only_delivery(app)
    assert row.status == "failed" and "Refused before connecting" in row.last_error
    assert f"{NAME} (10.0.0.7)" in row.last_error and "private" in row.last_error
    assert receiver.received == []


def test_one_refused_address_among_the_answers_refuses_the_name(app, api, hooks, receiver, dns):
    hooks["WEBHOOK_RETRY_DELAYS"] = ""
    dns["answers"] = [["127.0.0.1"], ["127.0.0.1", "169.254.169.254"]]
    add_endpoint(api, receiver)
    complete(app, api)
    deliver_all(app)
    assert "169.254.169.254" in only_delivery(app).last_error
    assert receiver.received == []


def test_the_connection_goes_to_the_address_that_was_checked(app, api, hooks, receiver, dns):
    secret = add_endpoint(api, receiver)
    lookups = dns["lookups"]
    complete(app, api)
    deliver_all(app)
    receiver.wait_for(1)[0].verify(secret)
    # One lookup for the try, by the check itself: the socket connects to that address, and
    # nothing resolves the name a second time (where a rebinding answer could slip in).
    assert dns["lookups"] - lookups == 1
    assert only_delivery(app).status == "delivered"
