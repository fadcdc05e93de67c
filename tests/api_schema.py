"""The API's OpenAPI document as schemathesis reads it: the fuzzer's (tests/test_fuzz.py) source of
operations, and of the submission schema tests/test_security.py checks its limits against.
"""

from __future__ import annotations

import schemathesis

from tests.helpers import TEST_DATABASE_URL, TEST_REDIS_URL
from tests.tally import counts
from webapp import create_app


class Forward:
    """A WSGI app that passes requests to the app under test, counting them.

    The schema is loaded when this module is imported (schemathesis builds one test per
    operation then), before the session's app exists: it is read from an app made only for
    that, and the requests go to the real one once the test runs.
    """

    def __init__(self, target):
        self.target = target

    def __call__(self, environ, start_response):
        if environ["PATH_INFO"] != "/api/v1/openapi.json":
            counts["API requests fuzzed (schemathesis)"] += 1
        return self.target(environ, start_response)


FORWARD = Forward(
    create_app(
        {"TESTING": True, "SECRET_KEY": "schema only", "DATABASE_URL": TEST_DATABASE_URL, "REDIS_URL": TEST_REDIS_URL}
    )
)
CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {"mode": "all"},
        "checks": {
            "positive_data_acceptance": {"expected-statuses": ["2xx", "401", "404", "409", "422", "429"]},
        },
    }
)
schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", FORWARD, config=CONFIG)
