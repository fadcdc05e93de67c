"""Extensions, created unbound here and bound to the app in create_app."""

import time

from flask_login import LoginManager
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from flask_wtf import CSRFProtect
from sqlalchemy import Engine, MetaData, event, exc

# Named constraints so Alembic can alter them, on SQLite (batch mode) as well.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Objects stay readable after commit without a reload; code that needs fresh state refreshes.
db = SQLAlchemy(metadata=MetaData(naming_convention=NAMING), session_options={"expire_on_commit": False})
migrate = Migrate(render_as_batch=True, compare_type=True)
login_manager = LoginManager()
# The cookie names a sign-in, not a user (webapp/services/sessions.py): login_user stores this.
login_manager.id_attribute = "get_session_key"
csrf = CSRFProtect()


def ping_after_idle(engine: Engine, idle_seconds: float) -> None:
    """Make the pool check a connection with a round trip before use, if it sat idle `idle_seconds`.

    SQLAlchemy's `pool_pre_ping` pays that round trip on every checkout, that is on every
    request. A connection used within the last moment is as good as checked; one that sat idle
    may have been cut (a database restart, a proxy's idle timeout) and is replaced, with every
    connection opened before it, before a request meets it. A restart under steady load is
    met by the requests that were using a connection at that moment (503) instead; the first
    error invalidates the rest of the pool, as the ping would.
    """

    @event.listens_for(engine, "checkin")
    def checked_in(dbapi_connection, record) -> None:
        if record is not None:
            record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def checked_out(dbapi_connection, record, proxy) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < idle_seconds:
            return  # a fresh connection, or one just used
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            raise exc.InvalidatePoolError() from error
