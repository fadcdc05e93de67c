"""API tokens are remembered per process, and a change anywhere is seen at once everywhere.

Each app (a gunicorn worker is one) keeps the users of tokens it has seen; a revocation, a
disabled user or a new budget made by another app instance or another process is refused or
applied on the very next call (webapp/token_cache.py).
"""

from __future__ import annotations

import subprocess
import sys

from sqlalchemy import event

from tests.helpers import api_client, app_with, redis_conn
from webapp.config import ROOT
from webapp.extensions import db
from webapp.models import ApiToken, User
from webapp.services import accounts, admin


class Statements:
    """The SQL statements run on an app's engine while active."""

    def __init__(self, app):
        with app.app_context():
            self.engine = db.engine
        self.seen: list[str] = []

    def _record(self, conn, cursor, statement, parameters, context, executemany):
        self.seen.append(statement)

    def __enter__(self):
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc):
        event.remove(self.engine, "before_cursor_execute", self._record)

    def token_lookups(self) -> int:
        return sum("FROM api_tokens" in statement for statement in self.seen)


def test_a_token_seen_lately_costs_no_query(app, api):
    assert api.get("/tasks").status_code == 200
    with Statements(app) as statements:
        assert api.get("/tasks").status_code == 200
        assert api.submit("remembered")["status"] == "PENDING"
    assert statements.token_lookups() == 0


def test_a_revocation_in_another_app_instance_is_refused_at_once(app, api):
    assert api.get("/tasks").status_code == 200  # remembered by this app
    other = app_with(app)
    with other.app_context():
        owner = db.session.get(User, api.user.id)
        token_id = db.session.scalar(db.select(ApiToken.id).where(ApiToken.user_id == owner.id))
        accounts.revoke_token(owner, token_id)
    assert api.get("/tasks").status_code == 401
    assert api.post("/tasks", json={"prompt": "after revocation"}).status_code == 401


def test_a_revocation_in_another_process_is_refused_at_once(app, api):
    assert api.get("/tasks").status_code == 200
    script = (
        "from webapp import create_app\n"
        "from webapp.services import accounts\n"
        "import sys\n"
        "config = {'DATABASE_URL': sys.argv[1], 'REDIS_URL': sys.argv[2], 'SECRET_KEY': 'x', 'TESTING': True}\n"
        "app = create_app(config)\n"
        "with app.app_context():\n"
        "    print(accounts.revoke_all_tokens(int(sys.argv[3])))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, app.config["DATABASE_URL"], app.config["REDIS_URL"], str(api.user.id)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip().splitlines()[-1] == "1"
    assert api.get("/tasks").status_code == 401


def test_a_disabled_user_and_a_new_budget_are_seen_at_once(app, api):
    boss = api_client(app, "boss", admin=True)
    assert api.get("/tasks").status_code == 200
    other = app_with(app)
    with other.app_context():
        acting = db.session.get(User, boss.user.id)
        admin.set_active(acting, api.user.id, False)
    assert api.get("/tasks").status_code == 401
    with other.app_context():
        admin.set_active(db.session.get(User, boss.user.id), api.user.id, True)
    assert api.get("/tasks").status_code == 200
    with other.app_context():
        from webapp import budgets

        budgets.set_budget(db.session.get(User, api.user.id), "12.50")
    usage = api.get("/usage").get_json()
    assert usage["budget_usd"] == 12.5


def test_redis_losing_its_data_forgets_every_remembered_token(app, api):
    assert api.get("/tasks").status_code == 200
    redis_conn().flushdb()  # the auth version is gone: a new one starts, no entry carries it
    with Statements(app) as statements:
        assert api.get("/tasks").status_code == 200
    assert statements.token_lookups() == 1


def test_without_redis_every_call_asks_the_database(app, api):
    broken = app_with(app, REDIS_URL="redis://127.0.0.1:9/0")
    client = broken.test_client()
    headers = {"Authorization": f"Bearer {api.token}"}
    with Statements(broken) as statements:
        for _ in range(2):
            assert client.get("/api/v1/tasks", headers=headers).status_code == 200
    assert statements.token_lookups() == 2
    with broken.app_context():
        db.session.query(ApiToken).update({"revoked_at": db.func.now()})
        db.session.commit()
    assert client.get("/api/v1/tasks", headers=headers).status_code == 401
