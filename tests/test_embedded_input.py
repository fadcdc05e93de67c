"""The bad-input tests and a browser smoke of every page on `make run`'s default path: SQLite under
instance/ and the embedded Valkey (the supervisor's own `start_valkey`), as every newcomer gets it.

The tests are the PostgreSQL suite's own, imported and so collected again here, where this
module's fixtures take the place of conftest's: `app` is on SQLite and Valkey, and `test_env`
starts subprocesses (the browser tests' worker) with no DATABASE_URL or REDIS_URL at all.
conftest's cleaning empties SQLite's tables and Valkey after each test; one Valkey and one
database file serve the whole module. The catalog is the tests' fake provider (the `local`
model has tests/test_embedded.py).
"""

from __future__ import annotations

import os

import pytest
from flask_migrate import upgrade

from tests import helpers
from tests.browser import needs_chromium
from tests.helpers import EMBEDDED_UNSET, ROOT, app_overrides

# The tests run again here (pytest collects what a module imports).
from tests.test_api import (  # noqa: F401  (the API's single bad-input cases)
    test_400_malformed_json,
    test_404_for_unknown_api_path_is_json,
    test_405_is_json,
    test_413_body_too_large_before_any_write,
    test_415_not_json,
    test_422_body_must_be_an_object,
    test_422_unknown_model_lists_what_exists,
    test_422_validation_names_the_field,
    test_idempotency_key_with_another_body_is_422,
    test_list_rejects_bad_parameters,
    test_lone_surrogate_is_422,
    test_nothing_is_written_on_validation_errors,
)
from tests.test_bad_ids import (  # noqa: F401
    id_world,
    test_a_real_cursor_still_pages,
    test_history_refuses_a_forged_cursor_with_a_message,
    test_ids_out_of_range_are_404_or_422,
    test_the_api_refuses_a_forged_cursor_with_422,
    test_the_largest_id_finds_nothing_in_the_ordinary_way,
)
from tests.test_contrast import (  # noqa: F401  (the browser smoke of every page, with its contrast check)
    browser,
    objects,
    page,
    server,
    test_every_page_reads_for_a_user_and_an_admin,
    watch,
    worker,
)
from tests.test_fuzz import (  # noqa: F401  (every page route's forms, queries and path ids)
    test_every_browser_route_survives_edge_values_in_every_field,
    test_every_browser_route_survives_random_input,
    world,
)
from tests.test_input import *  # noqa: F403  (the API's edge-input properties, each checking nothing is written)
from webapp import config as cfg
from webapp import create_app
from webapp.extensions import db
from webapp.supervisor import start_valkey

pytestmark = pytest.mark.embedded
# Marked where it is imported too: without Chromium it skips here as it does there.
test_every_page_reads_for_a_user_and_an_admin = needs_chromium(test_every_page_reads_for_a_user_and_an_admin)


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    return cfg.private_dir(tmp_path_factory.mktemp("embedded") / "instance")


@pytest.fixture(scope="module")
def valkey_url(instance):
    valkey = start_valkey(instance)
    yield cfg.redis_url(None, instance)
    valkey.stop()


@pytest.fixture(scope="module")
def test_env(models_file, instance, valkey_url) -> dict[str, str]:
    """`make run`'s environment: no DATABASE_URL or REDIS_URL, so a `flask` child finds both under INSTANCE_PATH."""
    env = {k: v for k, v in os.environ.items() if k not in EMBEDDED_UNSET}
    env.update(
        INSTANCE_PATH=str(instance),
        SECRET_KEY="test-secret",
        MODELS_FILE=str(models_file),
        DEFAULT_MODEL="fake",
        PROGRESS_INTERVAL="0.05",
        RETRY_BASE_SECONDS="0.01",
        RETRY_MAX_SECONDS="0.05",
        RATELIMIT_ENABLED="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    return env


@pytest.fixture(scope="module")
def app(test_env, instance, valkey_url):
    """The app on the embedded SQLite file and Valkey socket, migrated from nothing."""
    app = create_app(
        app_overrides(test_env, SQLALCHEMY_DATABASE_URI=cfg.database_uri(None, instance), REDIS_URL=valkey_url)
    )
    assert app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite:///")
    with app.app_context():
        upgrade()
    # The helpers (work(), the browser tests' worker check) reach "the tests' Redis": here, Valkey.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(helpers, "TEST_REDIS_URL", valkey_url)
        yield app
    with app.app_context():
        db.engine.dispose()


def test_this_module_runs_on_sqlite_and_the_embedded_valkey(app, instance):
    with app.app_context():
        assert db.engine.dialect.name == "sqlite"
    assert (instance / "app.db").exists() and (instance / "valkey.sock").exists()
    assert app.extensions["redis"].ping()
